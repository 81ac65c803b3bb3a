// Hashes and checksums shared by the addon's threads.
// XXH64 (seed 0) over whole 32-byte stripes (len % 32 == 0, len >= 32): the per-page hash of the
// migration digest (hash.cc), shared with the stream receiver thread (stream.cc).
#pragma once

#include <stddef.h>
#include <stdint.h>

namespace vmshift {
uint64_t Xxh64Stripes(const char* p, size_t len);
// The migration stream's CRC-32 (zlib's crc32, ISO-HDLC; PCLMULQDQ folding on x86-64, stream.cc);
// `crc` continues a previous one. Used by the receiver thread and the postcopy threads.
uint32_t Crc32(const uint8_t* p, size_t n, uint32_t crc = 0);
}  // namespace vmshift
