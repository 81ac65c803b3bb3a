// Argument and result helpers shared by every part of the addon (Node-API, C++17).
//
// Conventions of the whole addon
// - Setup calls throw an Error with `errno` and `syscall` properties.
// - Hot I/O calls (read, write, pread, pwrite, sendmsg, recvmsg, accept, ioctl) return a
//   negative errno instead of throwing, so "would block" costs no exception; src/sys turns
//   any other negative value into a typed SysError.
// - Every fd is created close-on-exec.
// - Integers arrive as JS numbers (exact up to 2^53) or BigInts (full 64 bits); a value that is
//   neither an integer nor representable is a TypeError, never a silent rounding.
// - Any length that comes from JS (an array's length, a view's byte length) is read once and
//   checked against the fixed C storage before anything is copied into it.
#pragma once

// node_api_create_external_sharedarraybuffer is still behind NAPI_EXPERIMENTAL (binding.gyp
// defines it for every file, so all files see the same Node-API types).
#include <node_api.h>

#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <unistd.h>

namespace vmshift {

// Adds 1 to an eventfd (wakes whoever polls it), retrying EINTR. A full counter (EAGAIN) or a
// closed fd is ignored: the reader is already due to wake, or gone.
inline void SignalEventfd(int fd) {
  uint64_t one = 1;
  while (write(fd, &one, sizeof one) < 0 && errno == EINTR) {
  }
}

// Up to 8 arguments, `this` and the function's data pointer of one call.
struct Args {
  static constexpr size_t kMax = 8;
  napi_env env;
  size_t argc = kMax;
  napi_value argv[kMax];
  napi_value self = nullptr;
  void* data = nullptr;
  Args(napi_env e, napi_callback_info info) : env(e) {
    napi_get_cb_info(env, info, &argc, argv, &self, &data);
    // Node-API fills missing arguments with undefined up to the requested count.
  }
  napi_value operator[](size_t i) const { return argv[i]; }
};

// Throwers: they always return nullptr, so a function can `return ThrowType(env, ...)`.
napi_value ThrowSys(napi_env env, const char* syscall_name, int err);
napi_value ThrowType(napi_env env, const char* msg);

// Argument readers: false means a TypeError is pending and the caller must return.
bool ArgU64(const Args& a, size_t i, uint64_t* out);
bool ArgInt(const Args& a, size_t i, int64_t* out);
bool ArgFd(const Args& a, size_t i, int* fd);
// Any string up to `cap - 1` UTF-8 bytes (NUL-terminated into buf).
bool ArgString(const Args& a, size_t i, char* buf, size_t cap, size_t* len);

// Pointer and byte length of a SharedArrayBuffer, ArrayBuffer, typed array or DataView.
bool View(napi_env env, napi_value v, char** p, size_t* len);
bool ArgView(const Args& a, size_t i, char** p, size_t* len);
// A Uint32Array, or null (returns true with *p == nullptr).
bool ArgU32ArrayOrNull(const Args& a, size_t i, uint32_t** p, size_t* count, const char* what);
bool IsNull(napi_env env, napi_value v);
bool IsTrue(napi_env env, napi_value v);

napi_value Undefined(napi_env env);
napi_value Num(napi_env env, double v);
napi_value Bool(napi_env env, bool v);
napi_value RetErrno(napi_env env);  // -errno as a number
napi_value Pair(napi_env env, double a, double b);

// Keeps the mapping (made by mmap()) that holds all of [p, p+len) from being munmapped until
// UnpinMapping(pin), from any thread; nullptr when no live mapping of ours holds the range.
// Retire() still overlays a pinned range (I/O into it then reads zeros / writes into scratch).
void* PinMapping(const char* p, size_t len);
void UnpinMapping(void* pin);

// Registration: every part adds its functions to the module's exports.
void SetFunction(napi_env env, napi_value exports, const char* name, napi_callback cb, void* data = nullptr);
void RegisterFd(napi_env env, napi_value exports);
void RegisterMmap(napi_env env, napi_value exports);
void RegisterSocket(napi_env env, napi_value exports);
void RegisterWatch(napi_env env, napi_value exports);
void RegisterBulk(napi_env env, napi_value exports);
void RegisterHash(napi_env env, napi_value exports);
void RegisterPostcopy(napi_env env, napi_value exports);
void RegisterBlkio(napi_env env, napi_value exports);
void RegisterStream(napi_env env, napi_value exports);

}  // namespace vmshift
