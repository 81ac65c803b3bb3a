/**
 * A virtqueue's "device needs reset" state, shared by the split and packed layouts: once a ring
 * itself is unusable (its memory is gone, its indices lie), every later call fails with
 * QUEUE_BROKEN citing the first error, until the queue is set up again.
 */
import { GuestMemoryError } from "../memory/errors.js";
import { VirtqueueError } from "./errors.js";

export class BrokenState {
  /** The error that broke the queue, or null while it works. */
  error: VirtqueueError | null = null;

  /** Records `e` as what broke the queue; returns it for `throw`. */
  break(e: VirtqueueError): VirtqueueError {
    this.error = e;
    return e;
  }

  /** Throws QUEUE_BROKEN when the queue is broken. */
  check(): void {
    const b = this.error;
    if (b) throw new VirtqueueError("QUEUE_BROKEN", `queue is broken: ${b.message}`, b.details, { cause: b });
  }

  /** A failed access to the ring's own memory breaks the queue (RING_ACCESS); anything else is rethrown. */
  ringAccess(e: unknown): never {
    if (e instanceof GuestMemoryError) {
      throw this.break(new VirtqueueError("RING_ACCESS", `ring access failed: ${e.message}`, {}, { cause: e }));
    }
    throw e;
  }
}
