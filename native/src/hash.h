// XXH64 (seed 0) over whole 32-byte stripes (len % 32 == 0, len >= 32): the per-page hash of the
// migration digest (hash.cc), shared with the stream receiver thread (stream.cc).
#pragma once

#include <stddef.h>
#include <stdint.h>

namespace vmshift {
uint64_t Xxh64Stripes(const char* p, size_t len);
}  // namespace vmshift
