/**
 * Tiny guests for KVM tests and benchmarks, and the long-mode setup a VMM does for them.
 *
 * Long mode without a mode switch in the guest: the VMM writes identity page tables
 * (PML4 → PDPT → PDs of 2 MiB pages) and a GDT into guest memory, then sets CR3, CR4.PAE,
 * CR0.PE|PG, EFER.LME|LMA and the segment registers with KVM_SET_SREGS, and RIP at the code.
 * Every paging entry has its Accessed bit (and the 2 MiB leaves their Dirty bit) preset, and
 * the GDT descriptors their Accessed bit, so the CPU (or KVM's shadow walker) never writes to
 * page tables or the GDT: the only pages the dirtying program dirties are the ones it targets.
 *
 * Guest-physical layout (identity mapped):
 *   0x0000_0500  GDT (null, 64-bit code, flat data)
 *   0x0000_1000  PML4
 *   0x0000_2000  PDPT
 *   0x0000_3000  PDs, one per GiB of guest memory (at most PD_MAX)
 *   0x0008_0000  code
 *   0x0010_0000  first byte the program may dirty (DIRTY_BASE)
 */
import type { GuestMemory } from "../memory/guest-memory.js";
import {
  EFER_LMA,
  EFER_LME,
  PTE_ACCESSED,
  PTE_DIRTY,
  PTE_PRESENT,
  PTE_PS,
  PTE_WRITE,
  type Regs,
  type Segment,
  type Sregs,
  X86_CR0_ET,
  X86_CR0_PE,
  X86_CR0_PG,
  X86_CR4_PAE,
} from "./abi.js";
import { KvmError } from "./errors.js";

export const GDT_ADDR = 0x500;
export const PML4_ADDR = 0x1000;
export const PDPT_ADDR = 0x2000;
export const PD_ADDR = 0x3000;
export const PD_MAX = (0x80000 - PD_ADDR) / 0x1000;
export const CODE_ADDR = 0x80000;
export const DIRTY_BASE = 0x100000;
export const PROGRESS_PORT = 0x10;
const GIB = 2 ** 30;
const MIB2 = 2 * 2 ** 20;

/**
 * The dirtying program, 64-bit code. Inputs in registers (set by dirtierRegs()):
 *   rdi = first address of the range, rsi = end of the range (exclusive),
 *   rcx = stride in bytes, rbx = writes per progress report (N),
 *   rbp = number of reports before `hlt` (0: run forever),
 *   r8 = cursor (next address), r9 = writes left until the next report,
 *   r10 = total writes so far (the value each write stores), r15 = reports so far (the counter).
 * Every write stores r10 at [r8]; every N writes it reports r15 on port 0x10 with a 4-byte OUT,
 * which is where the VMM throttles, pauses or kicks it. All of its state is in these registers,
 * so after KVM_GET_REGS/SREGS and a copy of memory it continues in another VM where it stopped.
 */
// biome-ignore format: one instruction per line, with its address and encoding
export const DIRTIER_CODE = Uint8Array.of(
  /* 0x00 loop: */ 0x4d, 0x89, 0x10, // mov [r8], r10     REX.WRB 89 /r, modrm 00 010 000
  /* 0x03       */ 0x49, 0xff, 0xc2, // inc r10           REX.WB FF /0, modrm 11 000 010
  /* 0x06       */ 0x49, 0x01, 0xc8, // add r8, rcx       REX.WB 01 /r, modrm 11 001 000
  /* 0x09       */ 0x49, 0x39, 0xf0, // cmp r8, rsi       REX.WB 39 /r (flags of r8 - rsi), modrm 11 110 000
  /* 0x0c       */ 0x72, 0x03,       // jb 0x11           skip the wrap while r8 < rsi (unsigned)
  /* 0x0e       */ 0x49, 0x89, 0xf8, // mov r8, rdi       wrap to the range start, modrm 11 111 000
  /* 0x11       */ 0x49, 0xff, 0xc9, // dec r9            REX.WB FF /1, modrm 11 001 001
  /* 0x14       */ 0x75, 0xea,       // jnz loop          rel8 -22: 0x16 - 22 = 0x00
  /* 0x16       */ 0x49, 0x89, 0xd9, // mov r9, rbx       reload the writes-per-report count, modrm 11 011 001
  /* 0x19       */ 0x49, 0xff, 0xc7, // inc r15           the progress counter, modrm 11 000 111
  /* 0x1c       */ 0x44, 0x89, 0xf8, // mov eax, r15d     REX.R 89 /r, modrm 11 111 000
  /* 0x1f       */ 0xe7, 0x10,       // out 0x10, eax     E7 ib: KVM_EXIT_IO, 4 bytes: the VMM's chance to act
  /* 0x21       */ 0x4c, 0x39, 0xfd, // cmp rbp, r15      REX.WR 39 /r (flags of rbp - r15), modrm 11 111 101
  /* 0x24       */ 0x75, 0xda,       // jne loop          rel8 -38: 0x26 - 38 = 0x00 (rbp = 0 never matches)
  /* 0x26 done: */ 0xf4,             // hlt               KVM_EXIT_HLT (there is no in-kernel irqchip)
  /* 0x27       */ 0xeb, 0xfd,       // jmp done          rel8 -3: a vCPU resumed after hlt halts again
);

/**
 * A real-mode program for the plainest test: CS base 0, loaded at 0x1000.
 *   mov al, 0x2a   (B0 2A)   out 0x11, al (E6 11)   in al, 0x12 (E4 12)   out 0x13, al (E6 13)   hlt (F4)
 * The VMM sees OUT 0x2a on port 0x11, an IN on port 0x12 (answered 0xff), an OUT of 0xff on
 * port 0x13, then KVM_EXIT_HLT.
 */
export const REAL_MODE_CODE = Uint8Array.of(0xb0, 0x2a, 0xe6, 0x11, 0xe4, 0x12, 0xe6, 0x13, 0xf4);
export const REAL_MODE_CODE_ADDR = 0x1000;

/** Points CS at 0 in real mode and RIP at REAL_MODE_CODE_ADDR (from the reset state). */
export function realModeState(sregs: Sregs, regs: Regs): { sregs: Sregs; regs: Regs } {
  return {
    sregs: { ...sregs, cs: { ...sregs.cs, base: 0n, selector: 0 } },
    regs: { ...regs, rip: BigInt(REAL_MODE_CODE_ADDR), rflags: 2n },
  };
}

/** Number of page-directory pages needed to identity-map `size` bytes. */
export function pageDirectories(size: number): number {
  return Math.ceil(size / GIB);
}

/**
 * Writes the GDT, the identity page tables for [0, mappedSize) and the dirtying program.
 * `memory` must hold [0, DIRTY_BASE); writing through GuestMemory marks no KVM dirty bit.
 */
export function writeLongModeGuest(memory: GuestMemory, mappedSize: number): void {
  const pds = pageDirectories(mappedSize);
  if (pds > PD_MAX) {
    throw new KvmError("BAD_STATE", `cannot map ${mappedSize} bytes with ${PD_MAX} page directories`, {
      mappedSize,
    });
  }
  const table = PTE_PRESENT | PTE_WRITE | PTE_ACCESSED;
  // GDT: null, code (0x08: present, DPL 0, code exec/read, accessed, L=1, G=1), data (0x10: RW, accessed, D/B=1, G=1).
  memory.writeU64(GDT_ADDR, 0n);
  memory.writeU64(GDT_ADDR + 8, 0x00af9b000000ffffn);
  memory.writeU64(GDT_ADDR + 16, 0x00cf93000000ffffn);
  memory.fill(PML4_ADDR, 0x1000, 0);
  memory.fill(PDPT_ADDR, 0x1000, 0);
  memory.writeU64(PML4_ADDR, BigInt(PDPT_ADDR) | table);
  for (let d = 0; d < pds; d++) {
    const pd = PD_ADDR + d * 0x1000;
    memory.writeU64(PDPT_ADDR + d * 8, BigInt(pd) | table);
    const entries = new Uint8Array(0x1000);
    const dv = new DataView(entries.buffer);
    for (let e = 0; e < 512; e++) {
      const phys = BigInt(d) * BigInt(GIB) + BigInt(e * MIB2);
      dv.setBigUint64(e * 8, phys | table | PTE_DIRTY | PTE_PS, true);
    }
    memory.write(pd, entries);
  }
  memory.write(CODE_ADDR, DIRTIER_CODE);
}

/** The GDT-matching segments and control registers of 64-bit mode, on top of the vCPU's reset sregs. */
export function longModeSregs(reset: Sregs): Sregs {
  const code: Segment = {
    base: 0n,
    limit: 0xffffffff,
    selector: 0x08,
    type: 11,
    present: 1,
    dpl: 0,
    db: 0,
    s: 1,
    l: 1,
    g: 1,
    avl: 0,
    unusable: 0,
  };
  const data: Segment = { ...code, selector: 0x10, type: 3, db: 1, l: 0 };
  return {
    ...reset,
    cs: code,
    ds: data,
    es: data,
    fs: data,
    gs: data,
    ss: data,
    gdt: { base: BigInt(GDT_ADDR), limit: 3 * 8 - 1 },
    cr0: X86_CR0_PE | X86_CR0_ET | X86_CR0_PG,
    cr3: BigInt(PML4_ADDR),
    cr4: X86_CR4_PAE,
    efer: EFER_LME | EFER_LMA,
  };
}

export interface DirtierOptions {
  /** First guest-physical address written (>= DIRTY_BASE). */
  start: number;
  /** End of the range (exclusive). */
  end: number;
  /** Bytes between writes: 4096 dirties every page, 8192 every other one (>= 8, a multiple of 8). */
  stride?: number;
  /** Writes between two progress reports (the I/O exit rate). */
  writesPerReport?: number;
  /** Reports before the program halts; 0 runs forever. */
  reports?: number;
}

/** The registers that start the dirtying program (see DIRTIER_CODE). */
export function dirtierRegs(reset: Regs, o: DirtierOptions): Regs {
  const stride = o.stride ?? 4096;
  const n = o.writesPerReport ?? 64;
  const bad = (why: string) =>
    new KvmError("BAD_STATE", `dirtier: ${why}`, { start: o.start, end: o.end, stride, writesPerReport: n });
  if (o.start < DIRTY_BASE) throw bad(`range starts below ${DIRTY_BASE}`);
  if (o.end <= o.start || o.end - o.start < 8) throw bad("empty range");
  if (stride < 8 || stride % 8 !== 0) throw bad("stride must be a positive multiple of 8");
  if (o.start % 8 !== 0) throw bad("start must be 8-byte aligned");
  if (!Number.isInteger(n) || n < 1) throw bad("writesPerReport must be >= 1");
  return {
    ...reset,
    rdi: BigInt(o.start),
    rsi: BigInt(o.end),
    rcx: BigInt(stride),
    rbx: BigInt(n),
    rbp: BigInt(o.reports ?? 0),
    r8: BigInt(o.start),
    r9: BigInt(n),
    r10: 0n,
    r15: 0n,
    rip: BigInt(CODE_ADDR),
    rflags: 2n,
  };
}

/** Guest-physical pages the program writes in its first `writes` writes (wrapping like the program). */
export function dirtierPages(o: DirtierOptions, writes: number): Set<number> {
  const stride = o.stride ?? 4096;
  const pages = new Set<number>();
  let a = o.start;
  for (let i = 0; i < writes; i++) {
    pages.add(Math.floor(a / 4096));
    a += stride;
    if (a >= o.end) a = o.start;
  }
  return pages;
}
