/**
 * src/kvm: KVM from TypeScript. The ABI (ioctl numbers derived with src/sys/ioctl.ts, struct
 * layouts, exit reasons) lives in abi.ts; Kvm opens /dev/kvm, Vm owns memslots, capabilities
 * and the VM-wide dirty ioctls, Vcpu owns a vCPU fd, its kvm_run and dirty ring mappings and
 * the worker thread that calls KVM_RUN (protocol.ts, vcpu-worker.ts). dirty.ts adapts the
 * bitmap and the rings to the DirtySource interface; guest.ts holds the tiny test guests and
 * the long-mode setup. See docs/kvm.md.
 */
export * from "./abi.js";
export * from "./dirty.js";
export * from "./errors.js";
export * from "./guest.js";
export * from "./kvm.js";
export * from "./micro-vm.js";
export type { PauseReason } from "./protocol.js";
export * from "./vcpu.js";
export * from "./vm.js";
