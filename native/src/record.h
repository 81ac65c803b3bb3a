// The migration stream's record format as the addon's threads read and write it (the receive
// thread in stream.cc, the postcopy threads in postcopy.cc); docs/migration-stream.md is the
// reference and src/migration/format.ts the TypeScript side.
//   record: u8 type | u8 flags | u16 zero | u32 payload length | payload | u32 CRC-32 of the rest
//   PAGES payload: u32 region | u32 count | u32 page[count] | u8 flag[count] | pad to 4 | data
//     flag 0: a full page, its 4096 bytes in data (in order); flag 1: a zero page, no data.
#pragma once

#include <stddef.h>
#include <stdint.h>

namespace vmshift {

constexpr size_t kStreamPage = 4096;
constexpr uint8_t kRecordPages = 0x10;
constexpr size_t kMaxRecordPayload = 64u << 20;

inline uint32_t Le32(const uint8_t* p) { return p[0] | p[1] << 8 | p[2] << 16 | (uint32_t)p[3] << 24; }
inline void Put32(uint8_t* p, uint32_t v) {
  p[0] = v;
  p[1] = v >> 8;
  p[2] = v >> 16;
  p[3] = v >> 24;
}

// A PAGES payload's layout, checked: every flag known and the data exactly the full pages.
// Page numbers and the region are the caller's to check (against its own regions).
struct PagesLayout {
  uint32_t region = 0, count = 0;
  const uint8_t* pages = nullptr;  // count little-endian u32
  const uint8_t* flags = nullptr;  // count bytes
  const uint8_t* data = nullptr;   // full * kStreamPage bytes
  size_t full = 0;
  uint32_t Page(uint32_t k) const { return Le32(pages + (size_t)k * 4); }
};

// nullptr when the payload is a well-formed PAGES payload (then *out is set), else why not.
inline const char* ParsePages(const uint8_t* pl, size_t len, PagesLayout* out) {
  if (len < 8) return "PAGES record too short";
  uint32_t count = Le32(pl + 4);
  if ((uint64_t)count * 5 + 8 > len) return "page count does not fit the payload";
  const uint8_t* flags = pl + 8 + (size_t)count * 4;
  size_t full = 0;
  for (uint32_t k = 0; k < count; k++) {
    if (flags[k] > 1) return "page with unknown flags";
    if (flags[k] == 0) full++;
  }
  size_t data = (8 + (size_t)count * 5 + 3) & ~(size_t)3;
  if (data > len || len - data != full * kStreamPage) return "data length does not match the flags";
  out->region = Le32(pl);
  out->count = count;
  out->pages = pl + 8;
  out->flags = flags;
  out->data = pl + data;
  out->full = full;
  return nullptr;
}

}  // namespace vmshift
