// Module registration: one Node-API module (ABI-stable, so one binary serves every supported
// Node line), context-aware by construction: every thread that loads it gets its own exports.
#include "args.h"

NAPI_MODULE_INIT(/* env, exports */) {
  vmshift::RegisterFd(env, exports);
  vmshift::RegisterMmap(env, exports);
  vmshift::RegisterSocket(env, exports);
  vmshift::RegisterWatch(env, exports);
  vmshift::RegisterBulk(env, exports);
  vmshift::RegisterHash(env, exports);
  vmshift::RegisterPostcopy(env, exports);
  vmshift::RegisterBlkio(env, exports);
  vmshift::RegisterStream(env, exports);
  return exports;
}
