// fd readiness in the libuv loop of the calling thread (main or worker).
//
// watch(fd, events, callback(status, events)) -> handle with stop(), ref(on), update(events).
// The uv handle is closed when stop() is called or, failing that, when the thread's environment
// is torn down (async cleanup hook), so a worker that exits with a live watch does not leave a
// dangling uv handle behind. The callback stays registered while the watch is open even if the
// JS handle object is collected (as before: a watch is stopped explicitly or by teardown).
//
// Ownership: the Watch (uv handle + callback reference) is freed in the uv close callback. The
// JS handle wraps a small Box that points at the Watch while it is open; Box and Watch clear
// each other's pointer when either goes first, and both live on this thread only.
#include <uv.h>

#include "args.h"

namespace vmshift {
namespace {

struct Box;

struct Watch {
  uv_poll_t poll;
  napi_env env;
  napi_ref cb = nullptr;
  napi_async_cleanup_hook_handle hook = nullptr;
  Box* box = nullptr;
  bool closing = false;
  bool tearing_down = false;
};

struct Box {
  Watch* w;
};

// Per-environment data: the constructor of watch handles (made once per addon instance).
struct EnvData {
  napi_ref ctor = nullptr;
};

void OnPoll(uv_poll_t* h, int status, int events) {
  Watch* w = static_cast<Watch*>(h->data);
  if (w->closing) return;
  napi_env env = w->env;
  napi_handle_scope scope;
  if (napi_open_handle_scope(env, &scope) != napi_ok) return;
  napi_value cb, global, argv[2];
  napi_get_reference_value(env, w->cb, &cb);
  napi_get_global(env, &global);
  napi_create_int32(env, status, &argv[0]);
  napi_create_int32(env, events, &argv[1]);
  // napi_make_callback runs the microtask and nextTick queues afterwards, like any libuv callback.
  napi_status s = napi_make_callback(env, nullptr, global, cb, 2, argv, nullptr);
  if (s == napi_pending_exception) {
    // Nobody up the stack can catch it: report it as an uncaught exception, as Node does.
    napi_value err;
    napi_get_and_clear_last_exception(env, &err);
    napi_fatal_exception(env, err);
  }
  napi_close_handle_scope(env, scope);
}

void OnWatchClosed(uv_handle_t* h) {
  Watch* w = static_cast<Watch*>(h->data);
  // During teardown the env drops its own references; touching them here could outlive it.
  if (!w->tearing_down && w->cb) napi_delete_reference(w->env, w->cb);
  if (w->box) w->box->w = nullptr;
  napi_async_cleanup_hook_handle hook = w->hook;
  delete w;
  if (hook) napi_remove_async_cleanup_hook(hook);  // tells the environment the cleanup is done
}

void CloseWatch(Watch* w) {
  if (w->closing) return;
  w->closing = true;
  if (w->box) {
    w->box->w = nullptr;
    w->box = nullptr;
  }
  uv_poll_stop(&w->poll);
  uv_close(reinterpret_cast<uv_handle_t*>(&w->poll), OnWatchClosed);
}

void WatchCleanupHook(napi_async_cleanup_hook_handle, void* arg) {
  Watch* w = static_cast<Watch*>(arg);
  w->tearing_down = true;
  CloseWatch(w);  // OnWatchClosed removes the hook, which completes it
}

// The JS handle was collected: the watch (if still open) no longer has a handle to clear.
void BoxFinalize(node_api_basic_env, void* data, void*) {
  Box* b = static_cast<Box*>(data);
  if (b->w) b->w->box = nullptr;
  delete b;
}

Watch* Unwrap(napi_env env, napi_callback_info info) {
  Args a(env, info);
  void* p = nullptr;
  if (napi_unwrap(env, a.self, &p) != napi_ok || !p) return nullptr;
  return static_cast<Box*>(p)->w;
}

napi_value WatchStop(napi_env env, napi_callback_info info) {
  Watch* w = Unwrap(env, info);
  if (!w) return nullptr;
  napi_async_cleanup_hook_handle hook = w->hook;
  w->hook = nullptr;
  if (hook) napi_remove_async_cleanup_hook(hook);
  CloseWatch(w);
  return nullptr;
}

napi_value WatchRef(napi_env env, napi_callback_info info) {
  Args a(env, info);
  Watch* w = Unwrap(env, info);
  if (!w) return nullptr;
  if (IsTrue(env, a[0]))
    uv_ref(reinterpret_cast<uv_handle_t*>(&w->poll));
  else
    uv_unref(reinterpret_cast<uv_handle_t*>(&w->poll));
  return nullptr;
}

napi_value WatchUpdate(napi_env env, napi_callback_info info) {
  Args a(env, info);
  Watch* w = Unwrap(env, info);
  int64_t events;
  if (!w || !ArgInt(a, 0, &events)) return nullptr;
  int r = uv_poll_start(&w->poll, (int)events, OnPoll);
  if (r < 0) return ThrowSys(env, "uv_poll_start", -r);
  return nullptr;
}

napi_value WatchCtor(napi_env env, napi_callback_info info) {
  Args a(env, info);
  return a.self;
}

napi_value WatchFd(napi_env env, napi_callback_info info) {
  Args a(env, info);
  EnvData* d = static_cast<EnvData*>(a.data);
  int fd;
  int64_t events;
  if (!ArgFd(a, 0, &fd) || !ArgInt(a, 1, &events)) return nullptr;
  napi_valuetype t;
  napi_typeof(env, a[2], &t);
  if (t != napi_function) return ThrowType(env, "watch needs a callback");
  uv_loop_t* loop = nullptr;
  if (napi_get_uv_event_loop(env, &loop) != napi_ok) return ThrowType(env, "no event loop");
  napi_value ctor, obj;
  napi_get_reference_value(env, d->ctor, &ctor);
  if (napi_new_instance(env, ctor, 0, nullptr, &obj) != napi_ok) return nullptr;
  Watch* w = new Watch();
  w->env = env;
  int r = uv_poll_init(loop, &w->poll, fd);
  if (r < 0) {
    delete w;
    return ThrowSys(env, "uv_poll_init", -r);
  }
  w->poll.data = w;
  r = uv_poll_start(&w->poll, (int)events, OnPoll);
  if (r < 0) {
    w->closing = true;
    uv_close(reinterpret_cast<uv_handle_t*>(&w->poll), OnWatchClosed);
    return ThrowSys(env, "uv_poll_start", -r);
  }
  napi_create_reference(env, a[2], 1, &w->cb);
  Box* b = new Box{w};
  w->box = b;
  napi_wrap(env, obj, b, BoxFinalize, nullptr, nullptr);
  napi_add_async_cleanup_hook(env, WatchCleanupHook, w, &w->hook);
  return obj;
}

}  // namespace

void RegisterWatch(napi_env env, napi_value exports) {
  EnvData* d = new EnvData();
  napi_property_descriptor methods[] = {
      {"stop", nullptr, WatchStop, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"ref", nullptr, WatchRef, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"update", nullptr, WatchUpdate, nullptr, nullptr, nullptr, napi_default, nullptr},
  };
  napi_value ctor;
  napi_define_class(env, "Watch", NAPI_AUTO_LENGTH, WatchCtor, nullptr, 3, methods, &ctor);
  napi_create_reference(env, ctor, 1, &d->ctor);
  // Freed with the environment (one per main thread or worker that loads the addon).
  // The reference itself belongs to the env that goes away with it.
  napi_add_env_cleanup_hook(env, [](void* p) { delete static_cast<EnvData*>(p); }, d);
  SetFunction(env, exports, "watch", WatchFd, d);
}

}  // namespace vmshift
