/**
 * `kvm`: the cost of collecting what a vCPU dirtied, KVM dirty ring against KVM dirty bitmap
 * (manual protect: GET_DIRTY_LOG + CLEAR_DIRTY_LOG + scan), for 1, 4 and 16 GiB memslots at
 * several dirty rates, in the same run. Guest memory is anonymous MAP_NORESERVE: only the
 * pages the guest touches cost RAM (at most 64Ki pages = 256 MiB per VM).
 *
 * Per round the long-mode dirtying program (src/kvm/guest.ts) writes D pages spread evenly
 * over the slot (stride = slot / D, so every round re-dirties the same D pages), reports once
 * and parks; then one sync collects them into a DirtyBitmap. Figures are medians of ROUNDS
 * rounds (ROUNDS) after a warm-up round (which faults the pages in):
 *  - "collect": the sync alone (ring: harvest + KVM_RESET_DIRTY_RINGS + staging → sink;
 *    bitmap: GET + CLEAR + scan → sink).
 *  - "round": guest dirtying + sync, which also counts what each method costs the guest
 *    (write-protect faults for both; full-ring exits and mid-round harvests for the ring).
 * value = ring, reference = bitmap; ratio > 1 means the ring is cheaper.
 */
import { KvmDirtyBitmapSource, KvmDirtyRingSource } from "../src/kvm/dirty.js";
import { DIRTY_BASE, dirtierRegs, longModeSregs, writeLongModeGuest } from "../src/kvm/guest.js";
import { Kvm, kvmUnavailableReason } from "../src/kvm/kvm.js";
import type { DirtySource } from "../src/memory/dirty-source.js";
import { DirtyBitmap } from "../src/memory/dirty-tracker.js";
import { GuestMemory } from "../src/memory/guest-memory.js";
import { GuestMemoryRegion } from "../src/memory/region.js";
import { type Figure, figure, median } from "./report.js";

const GiB = 2 ** 30;
const SIZES = [1, 4, 16];
const RATES = [256, 4096, 65536]; // pages dirtied per round
/** Measured rounds per rate (after one warm-up): more where a round is cheap and noisy. */
const ROUNDS: Record<number, number> = { 256: 15, 4096: 9, 65536: 5 };
const RING_ENTRIES = 65536; // 1 MiB per vCPU, the kernel's limit here

type Method = "ring" | "bitmap";

/** One VM with one slot of `sizeGiB` and one vCPU running the dirtier, tracked by `method`. */
class Rig {
  readonly vm;
  readonly memory;
  readonly vcpu;
  readonly source: DirtySource;
  readonly #reset;
  readonly #size: number;

  constructor(
    kvm: Kvm,
    readonly sizeGiB: number,
    readonly method: Method,
  ) {
    this.#size = sizeGiB * GiB;
    this.vm = kvm.createVm();
    this.memory = new GuestMemory([GuestMemoryRegion.anonymous(0, this.#size)]);
    writeLongModeGuest(this.memory, this.#size);
    this.vm.setMemory(this.memory);
    if (method === "ring") this.vm.enableDirtyRing(RING_ENTRIES);
    this.vcpu = this.vm.createVcpu(0);
    this.vcpu.setSregs(longModeSregs(this.vcpu.getSregs()));
    this.#reset = this.vcpu.getRegs();
    this.source = method === "ring" ? new KvmDirtyRingSource(this.vm) : new KvmDirtyBitmapSource(this.vm);
  }

  async start(): Promise<void> {
    await this.vm.startVcpus();
    await this.source.start();
  }

  get fullExits(): number {
    return this.source instanceof KvmDirtyRingSource ? this.source.ringFullExits : 0;
  }

  /** Points the program at `rate` pages spread over the slot; drains what is pending. */
  async configure(rate: number): Promise<void> {
    const stride = Math.floor((this.#size - DIRTY_BASE) / rate / 4096) * 4096;
    const end = DIRTY_BASE + stride * rate;
    const regs = dirtierRegs(this.#reset, { start: DIRTY_BASE, end, stride, writesPerReport: rate });
    // The counter goes on from the last rate's, so stop-at keeps meaning "one more report".
    this.vcpu.setRegs({ ...regs, r15: BigInt(this.vcpu.progress) });
    await this.source.sync(new DirtyBitmap(this.memory));
  }

  /** One round: the guest dirties `rate` pages, then one sync. Returns [collect, round] ms. */
  async round(rate: number): Promise<[number, number]> {
    this.vcpu.stopAtProgress(this.vcpu.progress + 1);
    const t0 = performance.now();
    const p = await this.vcpu.runUntilPause();
    if (p.reason !== "stop-at") throw p.error ?? new Error(`unexpected pause ${p.reason}`);
    const t1 = performance.now();
    const sink = new DirtyBitmap(this.memory);
    await this.source.sync(sink);
    const t2 = performance.now();
    const pages = sink.count();
    if (pages !== rate)
      throw new Error(`${this.method} ${this.sizeGiB} GiB: ${pages} pages collected, ${rate} dirtied`);
    return [t2 - t1, t2 - t0];
  }

  async close(): Promise<void> {
    await this.source.stop();
    await this.vm.close();
    this.memory.close();
  }
}

export async function run(): Promise<Figure[]> {
  const why = kvmUnavailableReason();
  if (why !== null) {
    process.stderr.write(`kvm bench SKIPPED: no usable /dev/kvm (${why})\n`);
    return [];
  }
  using kvm = Kvm.open();
  const figures: Figure[] = [];
  const ref = "KVM dirty bitmap, manual protect (GET+CLEAR+scan)";
  for (const size of SIZES) {
    // Both VMs live side by side and their rounds alternate, so machine noise hits both alike.
    const ring = new Rig(kvm, size, "ring");
    const bitmap = new Rig(kvm, size, "bitmap");
    try {
      await ring.start();
      await bitmap.start();
      for (const rate of RATES) {
        await ring.configure(rate);
        await bitmap.configure(rate);
        await ring.round(rate); // warm-up: first touch of every page
        await bitmap.round(rate);
        const full0 = ring.fullExits;
        const r: [number[], number[]] = [[], []];
        const b: [number[], number[]] = [[], []];
        const n = ROUNDS[rate] ?? 5;
        for (let i = 0; i < n; i++) {
          const [rc, rr] = await ring.round(rate);
          const [bc, br] = await bitmap.round(rate);
          r[0].push(rc);
          r[1].push(rr);
          b[0].push(bc);
          b[1].push(br);
        }
        const full = (ring.fullExits - full0) / n;
        const tag = `${size} GiB slot, ${rate} pages dirty`;
        const [rc, rr, bc, br] = [median(r[0]), median(r[1]), median(b[0]), median(b[1])];
        process.stderr.write(
          `kvm bench: ${tag}: collect ring ${rc.toFixed(3)} ms / bitmap ${bc.toFixed(3)} ms; ` +
            `round ring ${rr.toFixed(1)} ms / bitmap ${br.toFixed(1)} ms; ${full} full-ring exits per round\n`,
        );
        figures.push(figure("kvm", `collect ring vs bitmap, ${tag}`, "ms", "lower", rc, ref, bc));
        figures.push(
          figure("kvm", `dirty+collect round, ${tag} (${full} full-ring exits)`, "ms", "lower", rr, ref, br),
        );
      }
    } finally {
      await ring.close();
      await bitmap.close();
    }
  }
  return figures;
}
