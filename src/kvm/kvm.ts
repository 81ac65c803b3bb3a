import { SysError } from "../sys/errors.js";
import { Fd } from "../sys/fd.js";
import { O_RDWR, openFile } from "../sys/memfd.js";
import {
  KVM_API_VERSION,
  KVM_CAP_MAX_VCPU_ID,
  KVM_CAP_MAX_VCPUS,
  KVM_CAP_NR_MEMSLOTS,
  KVM_CHECK_EXTENSION,
  KVM_CREATE_VM,
  KVM_GET_API_VERSION,
  KVM_GET_VCPU_MMAP_SIZE,
} from "./abi.js";
import { KvmError, kvmIoctl } from "./errors.js";
import { Vm } from "./vm.js";

/** Why /dev/kvm cannot be used here, or null when it can (for tests that skip loudly). */
export function kvmUnavailableReason(path = "/dev/kvm"): string | null {
  try {
    using kvm = Kvm.open(path);
    void kvm;
    return null;
  } catch (e) {
    return e instanceof Error ? e.message : String(e);
  }
}

/** /dev/kvm: the system fd (API version, capabilities) and the factory of VMs. */
export class Kvm implements Disposable {
  readonly fd: Fd;
  /** Bytes to mmap from a vCPU fd for kvm_run and the pages after it. */
  readonly vcpuMmapSize: number;

  private constructor(fd: Fd) {
    this.fd = fd;
    const version = kvmIoctl(fd, KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION");
    if (version !== KVM_API_VERSION) {
      throw new KvmError("API_VERSION", `KVM API version ${version}, expected ${KVM_API_VERSION}`, {
        version,
        expected: KVM_API_VERSION,
      });
    }
    this.vcpuMmapSize = kvmIoctl(fd, KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE");
  }

  static open(path = "/dev/kvm"): Kvm {
    let fd: Fd;
    try {
      fd = openFile(path, O_RDWR);
    } catch (e) {
      const code = e instanceof SysError ? e.code : String(e);
      throw new KvmError("NO_KVM", `cannot open ${path}: ${code}`, { path, code });
    }
    try {
      return new Kvm(fd);
    } catch (e) {
      fd.close();
      throw e;
    }
  }

  /** KVM_CHECK_EXTENSION: 0 when absent, else a capability-specific value (often 1). */
  checkExtension(cap: number): number {
    return kvmIoctl(this.fd, KVM_CHECK_EXTENSION, cap, `KVM_CHECK_EXTENSION(${cap})`);
  }

  get maxVcpus(): number {
    return this.checkExtension(KVM_CAP_MAX_VCPUS) || 4;
  }

  /** Largest vCPU id + 1 (KVM_CAP_MAX_VCPU_ID, falling back to the vCPU count as the api says). */
  get maxVcpuId(): number {
    return this.checkExtension(KVM_CAP_MAX_VCPU_ID) || this.maxVcpus;
  }

  get maxMemslots(): number {
    return this.checkExtension(KVM_CAP_NR_MEMSLOTS) || 32;
  }

  createVm(): Vm {
    const fd = new Fd(kvmIoctl(this.fd, KVM_CREATE_VM, 0, "KVM_CREATE_VM"));
    return new Vm(this, fd);
  }

  close(): void {
    this.fd.close();
  }

  [Symbol.dispose](): void {
    this.close();
  }
}
