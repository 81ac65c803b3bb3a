/**
 * src/vm: a running micro-VM (src/kvm) moved by the migration engine (src/migration). This is
 * the only layer that knows both: the source's hooks stop and save the vCPU, the destination's
 * hooks build a VM over the received memory, restore the vCPU and check that the guest's
 * counter continues with no gap (its first report there is exactly the source's last + 1).
 *
 * Postcopy. The destination starts the vCPU before its memory has arrived. KVM touches guest
 * memory from the kernel (get_user_pages while handling an EPT/shadow fault), and the engine's
 * own userfaultfd is UFFD_USER_MODE_ONLY, which refuses kernel-mode faults (tried: the access
 * fails and the guest triple-faults, KVM_EXIT_SHUTDOWN, at its first missing page). So the
 * memslots point at a second mapping of the same memfd, registered (MISSING) with a
 * userfaultfd without UFFD_USER_MODE_ONLY and handed to the engine with addFaultDomain(): its
 * faults are served by the engine's page requests, and a page placed through the engine's
 * mapping is in the shared page cache, so the copy through ours returns EEXIST and just wakes.
 *
 * Verifying postcopy: the guest writes on the destination while pages still arrive, so its
 * memory cannot equal the source's stopped memory. The guest is deterministic (all its state
 * is in registers), so both sides run it from the switchover state S_k to exactly report k+1
 * and compare then: the source replays it after saving S_k (before any page is served), the
 * destination parks it at k+1 (stopAtProgress) and the engine hashes after beforeVerify().
 * Any page the destination got wrong, or lost, shows up as a digest mismatch.
 */
import { decodeVcpuState, encodeVcpuState, MicroVm } from "../kvm/micro-vm.js";
import type { VcpuState } from "../kvm/vcpu.js";
import type { GuestMemory } from "../memory/guest-memory.js";
import type { DestinationHooks, MigrationDestination } from "../migration/destination.js";
import { MigrationError } from "../migration/errors.js";
import type { DeviceState, SourceHooks } from "../migration/source.js";
import { Mapping } from "../sys/mapping.js";
import { UFFDIO_REGISTER_MODE_MISSING, Userfaultfd } from "../sys/userfaultfd.js";

/** The device-state record that carries the vCPU. */
export const VCPU_DEVICE_STATE = "kvm-vcpu0";
/** The device-state record of vCPU `i` (vCPU 0's is VCPU_DEVICE_STATE). */
export const vcpuDeviceState = (i: number) => `kvm-vcpu${i}`;

function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  return Promise.race([
    p,
    new Promise<never>((_, rej) => {
      timer = setTimeout(() => rej(new MigrationError("ABORTED", `${what}: no answer within ${ms} ms`)), ms);
    }),
  ]).finally(() => clearTimeout(timer));
}

/** The source side: hooks that pause, save, throttle and (on failure) resume the VM. */
export class VmSource {
  readonly vm: MicroVm;
  readonly mode: "precopy" | "postcopy";
  /** The guest's last report when it stopped for switchover (vCPU 0; null while running). */
  stoppedAt: number | null = null;
  /** Every vCPU's last report at the stop. */
  stoppedAtAll: number[] | null = null;
  readonly #timeoutMs: number;

  constructor(vm: MicroVm, mode: "precopy" | "postcopy", timeoutMs = 5000) {
    this.vm = vm;
    this.mode = mode;
    this.#timeoutMs = timeoutMs;
  }

  hooks(): SourceHooks {
    return {
      stopWriters: async () => {
        await this.vm.pause(this.#timeoutMs);
        this.stoppedAtAll = this.vm.progressAll;
        this.stoppedAt = this.stoppedAtAll[0] ?? null;
      },
      resumeWriters: () => {
        this.stoppedAt = null;
        this.stoppedAtAll = null;
        for (const v of this.vm.vcpus) v.stopAtProgress(0);
        this.vm.run();
      },
      throttle: (level) => this.vm.throttle(level),
      saveDeviceState: () => this.#save(),
    };
  }

  async #save(): Promise<DeviceState[]> {
    const ks = this.stoppedAtAll;
    const out: DeviceState[] = [];
    for (const [i, v] of this.vm.vcpus.entries()) {
      const state = v.getState();
      const k = ks?.[i];
      if (k === undefined || state.regs.r15 !== BigInt(k))
        throw new MigrationError("UNSUPPORTED", `vCPU ${i} counter ${state.regs.r15} is not its last report ${k}`);
      out.push({ name: vcpuDeviceState(i), blob: encodeVcpuState(state) });
    }
    if (this.mode === "postcopy") {
      // Replay S_k -> report k+1 here too (see the module comment); S_k is what travels. Each
      // vCPU writes only its own range, so each replays on its own.
      const vcpus = this.vm.vcpus;
      const done = await withTimeout(
        Promise.all(
          vcpus.map((v, i) => {
            v.stopAtProgress((ks?.[i] as number) + 1);
            return v.runUntilPause();
          }),
        ),
        this.#timeoutMs,
        "source replay to k+1",
      );
      done.forEach((p, i) => {
        const at = (vcpus[i] as (typeof vcpus)[number]).progress;
        if (p.reason !== "stop-at" || at !== (ks?.[i] as number) + 1)
          throw new MigrationError("UNSUPPORTED", `source replay of vCPU ${i} stopped at ${at} (${p.reason})`);
      });
    }
    return out;
  }
}

export interface Continuity {
  /** The source's last report (the counter in the received state). */
  stoppedAt: number;
  /** The first report the guest made here. */
  firstReport: number;
  /** Reports seen here when it parked at the first one (1: no gap, no repeat). */
  reports: number;
  /** firstReport === stoppedAt + 1 and reports === 1 (for every vCPU). */
  continued: boolean;
  /** ms from resume() to the first report here. */
  firstReportMs: number;
  /** The same for each vCPU (the fields above are vCPU 0's, `continued` all of them). */
  vcpus: { stoppedAt: number; firstReport: number; reports: number; continued: boolean }[];
}

export interface VmDestinationOptions {
  memory: GuestMemory;
  mode: "precopy" | "postcopy";
  timeoutMs?: number;
}

/**
 * The destination side: loads the vCPU state, builds the VM at resume() and parks it at the
 * first report to check the counter. Call attach() with the MigrationDestination (postcopy
 * needs it for the fault domain), then keepRunning() after the migration to let the guest go.
 */
export class VmDestination {
  readonly #o: VmDestinationOptions;
  readonly #states: VcpuState[] = [];
  vm: MicroVm | null = null;
  #dest: MigrationDestination | null = null;
  #uffd: Userfaultfd | null = null;
  #ranges: { start: bigint; size: number }[] = [];
  readonly #mappings: Mapping[] = [];
  #first: Promise<Continuity> | null = null;
  continuity: Continuity | null = null;

  constructor(o: VmDestinationOptions) {
    this.#o = o;
  }

  attach(dest: MigrationDestination): void {
    this.#dest = dest;
  }

  hooks(): DestinationHooks {
    return {
      loadDeviceState: (s) => {
        const m = /^kvm-vcpu(\d{1,2})$/.exec(s.name);
        if (!m) throw new MigrationError("UNSUPPORTED", `unknown device state ${s.name}`);
        this.#states[Number(m[1])] = decodeVcpuState(s.blob);
      },
      resume: async () => {
        await this.#resume();
        // Precopy: memory is complete and verified; wait for the first report right here.
        if (this.#o.mode === "precopy") await this.firstReport();
      },
      beforeVerify: async () => {
        await this.firstReport();
        this.#unregister();
      },
    };
  }

  async #resume(): Promise<void> {
    const states = this.#states;
    if (states.length === 0) throw new MigrationError("UNSUPPORTED", "resume without a vCPU state");
    for (let i = 0; i < states.length; i++)
      if (!states[i]) throw new MigrationError("UNSUPPORTED", `no state for vCPU ${i} of ${states.length}`);
    const memory = this.#o.memory;
    let slotMappings: Mapping[] | undefined;
    if (this.#o.mode === "postcopy") slotMappings = this.#faultingMappings();
    this.vm = await MicroVm.create({
      memory,
      dirtyTracking: "none",
      restore: states,
      ...(slotMappings ? { slotMappings } : {}),
    });
    const ks = states.map((st) => Number(st.regs.r15));
    const vcpus = this.vm.vcpus;
    const t0 = performance.now();
    const firsts = vcpus.map((v, i) => {
      v.stopAtProgress((ks[i] as number) + 1);
      return v.runUntilPause();
    });
    this.#first = withTimeout(
      Promise.all(firsts),
      this.#o.timeoutMs ?? 10_000,
      "destination guest's first report",
    ).then((ps) => {
      const per = ps.map((p, i) => {
        if (p.error) throw p.error;
        const v = vcpus[i] as (typeof vcpus)[number];
        const k = ks[i] as number;
        return {
          stoppedAt: k,
          firstReport: v.progress,
          reports: v.reports,
          continued: p.reason === "stop-at" && v.progress === k + 1 && v.reports === 1,
        };
      });
      const first = per[0] as (typeof per)[number];
      const c: Continuity = {
        ...first,
        continued: per.every((x) => x.continued),
        firstReportMs: performance.now() - t0,
        vcpus: per,
      };
      this.continuity = c;
      return c;
    });
    this.#first.catch(() => undefined);
  }

  /** Postcopy: a second mapping per region under a userfaultfd that also takes kernel faults. */
  #faultingMappings(): Mapping[] {
    const dest = this.#dest;
    if (!dest) throw new MigrationError("UNSUPPORTED", "postcopy: attach() the MigrationDestination first");
    const uffd = Userfaultfd.create({ userModeOnly: false });
    this.#uffd = uffd;
    const out: Mapping[] = [];
    const ranges = [];
    for (const r of this.#o.memory.regions) {
      const fd = r.backing.fd;
      if (!fd) throw new MigrationError("UNSUPPORTED", "postcopy needs fd-backed (memfd) guest memory");
      const m = Mapping.map(fd, r.size, { offset: r.backing.offset ?? 0 });
      this.#mappings.push(m);
      uffd.register(m.address, r.size, UFFDIO_REGISTER_MODE_MISSING);
      this.#ranges.push({ start: m.address, size: r.size });
      ranges.push({ guestBase: r.guestBase, size: r.size, hostStart: m.address });
      out.push(m);
    }
    dest.addFaultDomain(uffd, ranges);
    return out;
  }

  /** Every page is in: KVM's mapping no longer needs the fault domain. */
  #unregister(): void {
    for (const r of this.#ranges.splice(0)) this.#uffd?.unregister(r.start, r.size);
  }

  /** Resolves at the guest's first report here (parked there). */
  firstReport(): Promise<Continuity> {
    if (!this.#first) return Promise.reject(new MigrationError("UNSUPPORTED", "the VM was never resumed here"));
    return this.#first;
  }

  /** Lets the parked guest run on; resolves once it reported `more` times more. */
  async keepRunning(more: number, timeoutMs = 10_000): Promise<number> {
    const vm = this.vm;
    if (!vm) throw new MigrationError("UNSUPPORTED", "no VM here");
    for (const v of vm.vcpus) v.stopAtProgress(0);
    vm.run();
    return vm.vcpu.waitForProgress(vm.progress + more, timeoutMs);
  }

  async close(): Promise<void> {
    try {
      await this.vm?.close();
    } finally {
      this.vm = null;
      this.#unregister();
      this.#uffd?.close();
      this.#uffd = null;
      for (const m of this.#mappings.splice(0)) m.close();
    }
  }
}
