/**
 * The KVM ABI as TypeScript: ioctl request numbers derived with the asm-generic encoding
 * (src/sys/ioctl.ts), capability numbers, exit reasons and the byte layouts of the structs
 * we pass. Names are the kernel's (include/uapi/linux/kvm.h, arch/x86/include/uapi/asm/kvm.h).
 * Nothing outside this file touches a raw offset of a KVM struct.
 */
import { IO, IOR, IOW, IOWR } from "../sys/ioctl.js";

/** KVMIO, the ioctl type byte of every KVM request. */
export const KVMIO = 0xae;
export const KVM_API_VERSION = 12;

// ---------------------------------------------------------------------------------------------
// Struct sizes (x86-64). Each is checked against the ioctl numbers the kernel headers print in
// test/kvm/abi.test.ts, so a wrong size fails a test instead of an ioctl with ENOTTY.

/** struct kvm_userspace_memory_region { u32 slot, flags; u64 guest_phys_addr, memory_size, userspace_addr; } */
export const KVM_USERSPACE_MEMORY_REGION_SIZE = 32;
/** struct kvm_dirty_log { u32 slot, padding1; union { void *dirty_bitmap; u64 padding2; }; } */
export const KVM_DIRTY_LOG_SIZE = 16;
/** struct kvm_clear_dirty_log { u32 slot, num_pages; u64 first_page; union { void *dirty_bitmap; u64 }; } */
export const KVM_CLEAR_DIRTY_LOG_SIZE = 24;
/** struct kvm_enable_cap { u32 cap, flags; u64 args[4]; u8 pad[64]; } */
export const KVM_ENABLE_CAP_SIZE = 104;
/** struct kvm_regs: 16 GPRs, rip, rflags, all u64. */
export const KVM_REGS_SIZE = 18 * 8;
/** struct kvm_segment { u64 base; u32 limit; u16 selector; u8 type, present, dpl, db, s, l, g, avl, unusable, padding; } */
export const KVM_SEGMENT_SIZE = 24;
/** struct kvm_dtable { u64 base; u16 limit; u16 padding[3]; } */
export const KVM_DTABLE_SIZE = 16;
/** KVM_NR_INTERRUPTS (256) bits of interrupt_bitmap. */
export const KVM_NR_INTERRUPTS = 256;
/** struct kvm_sregs: 8 segments, 2 dtables, cr0 cr2 cr3 cr4 cr8 efer apic_base, interrupt_bitmap[4]. */
export const KVM_SREGS_SIZE = 8 * KVM_SEGMENT_SIZE + 2 * KVM_DTABLE_SIZE + 7 * 8 + (KVM_NR_INTERRUPTS / 64) * 8;

// ---------------------------------------------------------------------------------------------
// ioctl requests

// System (/dev/kvm)
export const KVM_GET_API_VERSION = IO(KVMIO, 0x00);
export const KVM_CREATE_VM = IO(KVMIO, 0x01);
export const KVM_CHECK_EXTENSION = IO(KVMIO, 0x03);
export const KVM_GET_VCPU_MMAP_SIZE = IO(KVMIO, 0x04);
// VM
export const KVM_CREATE_VCPU = IO(KVMIO, 0x41);
export const KVM_GET_DIRTY_LOG = IOW(KVMIO, 0x42, KVM_DIRTY_LOG_SIZE);
export const KVM_SET_USER_MEMORY_REGION = IOW(KVMIO, 0x46, KVM_USERSPACE_MEMORY_REGION_SIZE);
export const KVM_SET_TSS_ADDR = IO(KVMIO, 0x47);
export const KVM_ENABLE_CAP = IOW(KVMIO, 0xa3, KVM_ENABLE_CAP_SIZE);
export const KVM_CLEAR_DIRTY_LOG = IOWR(KVMIO, 0xc0, KVM_CLEAR_DIRTY_LOG_SIZE);
export const KVM_RESET_DIRTY_RINGS = IO(KVMIO, 0xc7);
// vCPU
export const KVM_RUN = IO(KVMIO, 0x80);
export const KVM_GET_REGS = IOR(KVMIO, 0x81, KVM_REGS_SIZE);
export const KVM_SET_REGS = IOW(KVMIO, 0x82, KVM_REGS_SIZE);
export const KVM_GET_SREGS = IOR(KVMIO, 0x83, KVM_SREGS_SIZE);
export const KVM_SET_SREGS = IOW(KVMIO, 0x84, KVM_SREGS_SIZE);

// ---------------------------------------------------------------------------------------------
// Capabilities (KVM_CHECK_EXTENSION / KVM_ENABLE_CAP)

export const KVM_CAP_USER_MEMORY = 3;
export const KVM_CAP_SET_TSS_ADDR = 4;
export const KVM_CAP_NR_VCPUS = 9;
export const KVM_CAP_NR_MEMSLOTS = 10;
export const KVM_CAP_MAX_VCPUS = 66;
export const KVM_CAP_MAX_VCPU_ID = 128;
export const KVM_CAP_IMMEDIATE_EXIT = 136;
export const KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168;
export const KVM_CAP_DIRTY_LOG_RING = 192;
export const KVM_CAP_DIRTY_LOG_RING_ACQ_REL = 223;
/** Newer than /usr/include/linux/kvm.h on this machine (kernel 6.18 has it: 225). */
export const KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP = 225;

/** KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 argument bits. */
export const KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0;
export const KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1;

/** Memslot flags. */
export const KVM_MEM_LOG_DIRTY_PAGES = 1 << 0;
export const KVM_MEM_READONLY = 1 << 1;

/** The dirty ring of a vCPU is mmap'd from its fd at this page offset (x86: asm/kvm.h). */
export const KVM_DIRTY_LOG_PAGE_OFFSET = 64;

// ---------------------------------------------------------------------------------------------
// Exit reasons (kvm_run.exit_reason)

export const KVM_EXIT_UNKNOWN = 0;
export const KVM_EXIT_EXCEPTION = 1;
export const KVM_EXIT_IO = 2;
export const KVM_EXIT_HYPERCALL = 3;
export const KVM_EXIT_DEBUG = 4;
export const KVM_EXIT_HLT = 5;
export const KVM_EXIT_MMIO = 6;
export const KVM_EXIT_IRQ_WINDOW_OPEN = 7;
export const KVM_EXIT_SHUTDOWN = 8;
export const KVM_EXIT_FAIL_ENTRY = 9;
export const KVM_EXIT_INTR = 10;
export const KVM_EXIT_INTERNAL_ERROR = 17;
export const KVM_EXIT_SYSTEM_EVENT = 24;
export const KVM_EXIT_DIRTY_RING_FULL = 31;

export const KVM_EXIT_IO_IN = 0;
export const KVM_EXIT_IO_OUT = 1;

const exitNames: Record<number, string> = {
  [KVM_EXIT_UNKNOWN]: "KVM_EXIT_UNKNOWN",
  [KVM_EXIT_EXCEPTION]: "KVM_EXIT_EXCEPTION",
  [KVM_EXIT_IO]: "KVM_EXIT_IO",
  [KVM_EXIT_HYPERCALL]: "KVM_EXIT_HYPERCALL",
  [KVM_EXIT_DEBUG]: "KVM_EXIT_DEBUG",
  [KVM_EXIT_HLT]: "KVM_EXIT_HLT",
  [KVM_EXIT_MMIO]: "KVM_EXIT_MMIO",
  [KVM_EXIT_IRQ_WINDOW_OPEN]: "KVM_EXIT_IRQ_WINDOW_OPEN",
  [KVM_EXIT_SHUTDOWN]: "KVM_EXIT_SHUTDOWN",
  [KVM_EXIT_FAIL_ENTRY]: "KVM_EXIT_FAIL_ENTRY",
  [KVM_EXIT_INTR]: "KVM_EXIT_INTR",
  [KVM_EXIT_INTERNAL_ERROR]: "KVM_EXIT_INTERNAL_ERROR",
  [KVM_EXIT_SYSTEM_EVENT]: "KVM_EXIT_SYSTEM_EVENT",
  [KVM_EXIT_DIRTY_RING_FULL]: "KVM_EXIT_DIRTY_RING_FULL",
};

export function exitName(reason: number): string {
  return exitNames[reason] ?? `KVM_EXIT_${reason}`;
}

// ---------------------------------------------------------------------------------------------
// struct kvm_run (the head and the union members we handle). The union starts at 32 on x86.

export const KvmRun = {
  request_interrupt_window: 0,
  immediate_exit: 1,
  exit_reason: 8,
  ready_for_interrupt_injection: 12,
  if_flag: 13,
  flags: 14,
  cr8: 16,
  apic_base: 24,
  /** union: hw.hardware_exit_reason (u64) */
  hw_hardware_exit_reason: 32,
  /** union: fail_entry { u64 hardware_entry_failure_reason; u32 cpu; } */
  fail_entry_reason: 32,
  fail_entry_cpu: 40,
  /** union: ex { u32 exception; u32 error_code; } */
  ex_exception: 32,
  ex_error_code: 36,
  /** union: io { u8 direction; u8 size; u16 port; u32 count; u64 data_offset; } */
  io_direction: 32,
  io_size: 33,
  io_port: 34,
  io_count: 36,
  io_data_offset: 40,
  /** union: mmio { u64 phys_addr; u8 data[8]; u32 len; u8 is_write; } */
  mmio_phys_addr: 32,
  mmio_data: 40,
  mmio_len: 48,
  mmio_is_write: 52,
  /** union: internal { u32 suberror; u32 ndata; u64 data[16]; } */
  internal_suberror: 32,
  internal_ndata: 36,
  internal_data: 40,
} as const;

// ---------------------------------------------------------------------------------------------
// Typed registers and their codecs

export const REG_NAMES = [
  "rax",
  "rbx",
  "rcx",
  "rdx",
  "rsi",
  "rdi",
  "rsp",
  "rbp",
  "r8",
  "r9",
  "r10",
  "r11",
  "r12",
  "r13",
  "r14",
  "r15",
  "rip",
  "rflags",
] as const;
export type RegName = (typeof REG_NAMES)[number];
/** struct kvm_regs, every register a full 64-bit BigInt. */
export type Regs = Record<RegName, bigint>;

export function decodeRegs(b: Uint8Array): Regs {
  const dv = new DataView(b.buffer, b.byteOffset, KVM_REGS_SIZE);
  const r = {} as Regs;
  REG_NAMES.forEach((n, i) => {
    r[n] = dv.getBigUint64(i * 8, true);
  });
  return r;
}

export function encodeRegs(r: Regs, b = new Uint8Array(KVM_REGS_SIZE)): Uint8Array {
  const dv = new DataView(b.buffer, b.byteOffset, KVM_REGS_SIZE);
  REG_NAMES.forEach((n, i) => {
    dv.setBigUint64(i * 8, BigInt.asUintN(64, r[n]), true);
  });
  return b;
}

/** struct kvm_segment */
export interface Segment {
  base: bigint;
  limit: number;
  selector: number;
  type: number;
  present: number;
  dpl: number;
  db: number;
  s: number;
  l: number;
  g: number;
  avl: number;
  unusable: number;
}

/** struct kvm_dtable */
export interface DescriptorTable {
  base: bigint;
  limit: number;
}

export const SEGMENT_NAMES = ["cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"] as const;
export type SegmentName = (typeof SEGMENT_NAMES)[number];

/** struct kvm_sregs */
export interface Sregs extends Record<SegmentName, Segment> {
  gdt: DescriptorTable;
  idt: DescriptorTable;
  cr0: bigint;
  cr2: bigint;
  cr3: bigint;
  cr4: bigint;
  cr8: bigint;
  efer: bigint;
  apic_base: bigint;
  /** Pending external interrupt bits (KVM_NR_INTERRUPTS), as four u64 words. */
  interrupt_bitmap: [bigint, bigint, bigint, bigint];
}

const SREGS_DTABLES = 8 * KVM_SEGMENT_SIZE;
const SREGS_CRS = SREGS_DTABLES + 2 * KVM_DTABLE_SIZE;
const SREGS_INTERRUPTS = SREGS_CRS + 7 * 8;
const CR_NAMES = ["cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base"] as const;

function decodeSegment(dv: DataView, o: number): Segment {
  return {
    base: dv.getBigUint64(o, true),
    limit: dv.getUint32(o + 8, true),
    selector: dv.getUint16(o + 12, true),
    type: dv.getUint8(o + 14),
    present: dv.getUint8(o + 15),
    dpl: dv.getUint8(o + 16),
    db: dv.getUint8(o + 17),
    s: dv.getUint8(o + 18),
    l: dv.getUint8(o + 19),
    g: dv.getUint8(o + 20),
    avl: dv.getUint8(o + 21),
    unusable: dv.getUint8(o + 22),
  };
}

function encodeSegment(dv: DataView, o: number, s: Segment): void {
  dv.setBigUint64(o, BigInt.asUintN(64, s.base), true);
  dv.setUint32(o + 8, s.limit >>> 0, true);
  dv.setUint16(o + 12, s.selector, true);
  dv.setUint8(o + 14, s.type);
  dv.setUint8(o + 15, s.present);
  dv.setUint8(o + 16, s.dpl);
  dv.setUint8(o + 17, s.db);
  dv.setUint8(o + 18, s.s);
  dv.setUint8(o + 19, s.l);
  dv.setUint8(o + 20, s.g);
  dv.setUint8(o + 21, s.avl);
  dv.setUint8(o + 22, s.unusable);
  dv.setUint8(o + 23, 0);
}

export function decodeSregs(b: Uint8Array): Sregs {
  const dv = new DataView(b.buffer, b.byteOffset, KVM_SREGS_SIZE);
  const seg = {} as Record<SegmentName, Segment>;
  SEGMENT_NAMES.forEach((n, i) => {
    seg[n] = decodeSegment(dv, i * KVM_SEGMENT_SIZE);
  });
  const dt = (o: number): DescriptorTable => ({ base: dv.getBigUint64(o, true), limit: dv.getUint16(o + 8, true) });
  const cr = (i: number) => dv.getBigUint64(SREGS_CRS + i * 8, true);
  const ib = (i: number) => dv.getBigUint64(SREGS_INTERRUPTS + i * 8, true);
  return {
    ...seg,
    gdt: dt(SREGS_DTABLES),
    idt: dt(SREGS_DTABLES + KVM_DTABLE_SIZE),
    cr0: cr(0),
    cr2: cr(1),
    cr3: cr(2),
    cr4: cr(3),
    cr8: cr(4),
    efer: cr(5),
    apic_base: cr(6),
    interrupt_bitmap: [ib(0), ib(1), ib(2), ib(3)],
  };
}

export function encodeSregs(s: Sregs, b = new Uint8Array(KVM_SREGS_SIZE)): Uint8Array {
  b.fill(0);
  const dv = new DataView(b.buffer, b.byteOffset, KVM_SREGS_SIZE);
  SEGMENT_NAMES.forEach((n, i) => {
    encodeSegment(dv, i * KVM_SEGMENT_SIZE, s[n]);
  });
  const dt = (o: number, d: DescriptorTable) => {
    dv.setBigUint64(o, BigInt.asUintN(64, d.base), true);
    dv.setUint16(o + 8, d.limit, true);
  };
  dt(SREGS_DTABLES, s.gdt);
  dt(SREGS_DTABLES + KVM_DTABLE_SIZE, s.idt);
  CR_NAMES.forEach((n, i) => {
    dv.setBigUint64(SREGS_CRS + i * 8, BigInt.asUintN(64, s[n]), true);
  });
  s.interrupt_bitmap.forEach((w, i) => {
    dv.setBigUint64(SREGS_INTERRUPTS + i * 8, BigInt.asUintN(64, w), true);
  });
  return b;
}

export function encodeUserspaceMemoryRegion(
  slot: number,
  flags: number,
  guestPhysAddr: bigint,
  memorySize: bigint,
  userspaceAddr: bigint,
): Uint8Array {
  const b = new Uint8Array(KVM_USERSPACE_MEMORY_REGION_SIZE);
  const dv = new DataView(b.buffer);
  dv.setUint32(0, slot, true);
  dv.setUint32(4, flags, true);
  dv.setBigUint64(8, guestPhysAddr, true);
  dv.setBigUint64(16, memorySize, true);
  dv.setBigUint64(24, userspaceAddr, true);
  return b;
}

export function encodeDirtyLog(slot: number, bitmapAddress: bigint): Uint8Array {
  const b = new Uint8Array(KVM_DIRTY_LOG_SIZE);
  const dv = new DataView(b.buffer);
  dv.setUint32(0, slot, true);
  dv.setBigUint64(8, bitmapAddress, true);
  return b;
}

export function encodeClearDirtyLog(
  slot: number,
  firstPage: number,
  numPages: number,
  bitmapAddress: bigint,
): Uint8Array {
  const b = new Uint8Array(KVM_CLEAR_DIRTY_LOG_SIZE);
  const dv = new DataView(b.buffer);
  dv.setUint32(0, slot, true);
  dv.setUint32(4, numPages, true);
  dv.setBigUint64(8, BigInt(firstPage), true);
  dv.setBigUint64(16, bitmapAddress, true);
  return b;
}

export function encodeEnableCap(cap: number, args: readonly (number | bigint)[] = [], flags = 0): Uint8Array {
  if (args.length > 4) throw new RangeError("kvm_enable_cap takes at most 4 args");
  const b = new Uint8Array(KVM_ENABLE_CAP_SIZE);
  const dv = new DataView(b.buffer);
  dv.setUint32(0, cap, true);
  dv.setUint32(4, flags, true);
  args.forEach((a, i) => {
    dv.setBigUint64(8 + i * 8, BigInt.asUintN(64, BigInt(a)), true);
  });
  return b;
}

// ---------------------------------------------------------------------------------------------
// x86 control-register and paging bits used to set up long mode

export const X86_CR0_PE = 1n << 0n;
export const X86_CR0_ET = 1n << 4n;
export const X86_CR0_NE = 1n << 5n;
export const X86_CR0_PG = 1n << 31n;
export const X86_CR4_PAE = 1n << 5n;
export const EFER_LME = 1n << 8n;
export const EFER_LMA = 1n << 10n;
export const PTE_PRESENT = 1n << 0n;
export const PTE_WRITE = 1n << 1n;
export const PTE_ACCESSED = 1n << 5n;
export const PTE_DIRTY = 1n << 6n;
/** PS in a PDE: the entry maps a 2 MiB page. */
export const PTE_PS = 1n << 7n;
