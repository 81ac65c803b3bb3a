#include "args.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

namespace vmshift {

napi_value ThrowSys(napi_env env, const char* syscall_name, int err) {
  char msg[256];
  snprintf(msg, sizeof msg, "%s: %s", syscall_name, strerror(err));
  napi_value text, e, code, name;
  napi_create_string_utf8(env, msg, NAPI_AUTO_LENGTH, &text);
  napi_create_error(env, nullptr, text, &e);
  napi_create_int32(env, err, &code);
  napi_create_string_utf8(env, syscall_name, NAPI_AUTO_LENGTH, &name);
  napi_set_named_property(env, e, "errno", code);
  napi_set_named_property(env, e, "syscall", name);
  napi_throw(env, e);
  return nullptr;
}

napi_value ThrowType(napi_env env, const char* msg) {
  napi_throw_type_error(env, nullptr, msg);
  return nullptr;
}

static napi_valuetype TypeOf(napi_env env, napi_value v) {
  napi_valuetype t = napi_undefined;
  napi_typeof(env, v, &t);
  return t;
}

bool ArgU64(const Args& a, size_t i, uint64_t* out) {
  napi_valuetype t = TypeOf(a.env, a[i]);
  if (t == napi_bigint) {
    bool lossless = false;
    napi_get_value_bigint_uint64(a.env, a[i], out, &lossless);
    // A negative BigInt comes back wrapped and not lossless.
    if (!lossless) {
      ThrowType(a.env, "BigInt argument out of u64 range");
      return false;
    }
    return true;
  }
  if (t == napi_number) {
    double d;
    napi_get_value_double(a.env, a[i], &d);
    if (d >= 0 && d <= 9007199254740991.0 && d == (double)(uint64_t)d) {
      *out = (uint64_t)d;
      return true;
    }
  }
  ThrowType(a.env, "expected a non-negative safe integer or BigInt");
  return false;
}

bool ArgInt(const Args& a, size_t i, int64_t* out) {
  if (TypeOf(a.env, a[i]) == napi_number) {
    double d;
    napi_get_value_double(a.env, a[i], &d);
    if (d >= -9007199254740991.0 && d <= 9007199254740991.0 && d == (double)(int64_t)d) {
      *out = (int64_t)d;
      return true;
    }
  }
  ThrowType(a.env, "expected a safe integer");
  return false;
}

bool ArgFd(const Args& a, size_t i, int* fd) {
  int64_t v;
  if (!ArgInt(a, i, &v)) return false;
  if (v < 0 || v > INT32_MAX) {
    ThrowType(a.env, "invalid fd");
    return false;
  }
  *fd = (int)v;
  return true;
}

bool ArgString(const Args& a, size_t i, char* buf, size_t cap, size_t* len) {
  if (TypeOf(a.env, a[i]) != napi_string) {
    ThrowType(a.env, "expected a string");
    return false;
  }
  size_t need = 0;
  napi_get_value_string_utf8(a.env, a[i], nullptr, 0, &need);
  if (need >= cap) {
    ThrowType(a.env, "string argument too long");
    return false;
  }
  napi_get_value_string_utf8(a.env, a[i], buf, cap, len);
  if (strlen(buf) != *len) {
    ThrowType(a.env, "string argument contains a NUL byte");
    return false;
  }
  return true;
}

static size_t ElementSize(napi_typedarray_type t) {
  switch (t) {
    case napi_int8_array:
    case napi_uint8_array:
    case napi_uint8_clamped_array:
      return 1;
    case napi_int16_array:
    case napi_uint16_array:
#ifdef NAPI_EXPERIMENTAL
    case napi_float16_array:
#endif
      return 2;
    case napi_int32_array:
    case napi_uint32_array:
    case napi_float32_array:
      return 4;
    default:
      return 8;
  }
}

bool View(napi_env env, napi_value v, char** p, size_t* len) {
  bool is = false;
  // Typed arrays first: they are what the hot paths pass.
  napi_is_typedarray(env, v, &is);
  if (is) {
    napi_typedarray_type t;
    size_t n;
    void* data;
    // `data` already points at the view's first element (byte offset applied).
    napi_get_typedarray_info(env, v, &t, &n, &data, nullptr, nullptr);
    *p = static_cast<char*>(data);
    *len = n * ElementSize(t);
    return true;
  }
  node_api_is_sharedarraybuffer(env, v, &is);
  if (!is) napi_is_arraybuffer(env, v, &is);
  if (is) {
    void* data;
    if (napi_get_arraybuffer_info(env, v, &data, len) != napi_ok) return false;
    *p = static_cast<char*>(data);
    return true;
  }
  napi_is_dataview(env, v, &is);
  if (is) {
    void* data;
    napi_get_dataview_info(env, v, len, &data, nullptr, nullptr);
    *p = static_cast<char*>(data);
    return true;
  }
  return false;
}

bool ArgView(const Args& a, size_t i, char** p, size_t* len) {
  if (View(a.env, a[i], p, len)) return true;
  ThrowType(a.env, "expected an ArrayBuffer, SharedArrayBuffer or typed array");
  return false;
}

bool IsNull(napi_env env, napi_value v) { return TypeOf(env, v) == napi_null; }

bool IsTrue(napi_env env, napi_value v) {
  if (TypeOf(env, v) != napi_boolean) return false;
  bool b = false;
  napi_get_value_bool(env, v, &b);
  return b;
}

bool ArgU32ArrayOrNull(const Args& a, size_t i, uint32_t** p, size_t* count, const char* what) {
  *p = nullptr;
  *count = 0;
  if (IsNull(a.env, a[i])) return true;
  bool is = false;
  napi_is_typedarray(a.env, a[i], &is);
  if (is) {
    napi_typedarray_type t;
    void* data;
    napi_get_typedarray_info(a.env, a[i], &t, count, &data, nullptr, nullptr);
    if (t == napi_uint32_array) {
      *p = static_cast<uint32_t*>(data);
      return true;
    }
  }
  ThrowType(a.env, what);
  return false;
}

napi_value Undefined(napi_env env) {
  napi_value v;
  napi_get_undefined(env, &v);
  return v;
}

napi_value Num(napi_env env, double d) {
  napi_value v;
  napi_create_double(env, d, &v);
  return v;
}

napi_value Bool(napi_env env, bool b) {
  napi_value v;
  napi_get_boolean(env, b, &v);
  return v;
}

napi_value RetErrno(napi_env env) { return Num(env, -(double)errno); }

napi_value Pair(napi_env env, double x, double y) {
  napi_value r;
  napi_create_array_with_length(env, 2, &r);
  napi_set_element(env, r, 0, Num(env, x));
  napi_set_element(env, r, 1, Num(env, y));
  return r;
}

void SetFunction(napi_env env, napi_value exports, const char* name, napi_callback cb, void* data) {
  napi_value fn;
  napi_create_function(env, name, NAPI_AUTO_LENGTH, cb, data, &fn);
  napi_set_named_property(env, exports, name, fn);
}

}  // namespace vmshift
