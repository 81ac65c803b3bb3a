/**
 * The front-end's postcopy state (PAGEFAULT): POSTCOPY_ADVISE -> POSTCOPY_LISTEN -> (memory
 * table in its postcopy form) -> POSTCOPY_END, in QEMU's order, and the back-end's userfaultfd
 * held in between. Serving the back-end's faults is the caller's (src/vm/vhost-postcopy.ts).
 */
import { Userfaultfd } from "../../sys/userfaultfd.js";
import type { Connection } from "../connection.js";
import { hasFeature, ProtocolFeature } from "../protocol/constants.js";
import { VhostUserError } from "../protocol/errors.js";
import type { FrontendRequests } from "../protocol/frontend-requests.js";
import { FrontendError } from "./errors.js";

export type PostcopyPhase = "none" | "advised" | "listening" | "ended";

/**
 * Why a back-end cannot take part in a postcopy migration, or null when it can. A back-end
 * without PAGEFAULT would read guest pages that have not arrived yet (zeros) and never tell
 * anyone: postcopy must be refused before it starts, precopy still works.
 */
export function postcopyRefusal(features: bigint | null, offered: bigint | null, negotiated: bigint): string | null {
  if (features === null) return "features were not negotiated yet";
  if (offered === null)
    return "the back-end does not offer VHOST_USER_F_PROTOCOL_FEATURES, hence no VHOST_USER_PROTOCOL_F_PAGEFAULT";
  if (!hasFeature(offered, ProtocolFeature.PAGEFAULT))
    return "the back-end does not offer VHOST_USER_PROTOCOL_F_PAGEFAULT: it cannot have its faults on guest pages that have not arrived served";
  if (!hasFeature(negotiated, ProtocolFeature.PAGEFAULT))
    return "VHOST_USER_PROTOCOL_F_PAGEFAULT is offered but was not enabled by SET_PROTOCOL_FEATURES";
  return null;
}

export class FrontendPostcopy {
  phase: PostcopyPhase = "none";
  /** The back-end's userfaultfd (POSTCOPY_ADVISE), owned here until POSTCOPY_END or close(). */
  uffd: Userfaultfd | null = null;

  get listening(): boolean {
    return this.phase === "listening";
  }

  async advise(conn: Connection<FrontendRequests>, refusal: string | null): Promise<Userfaultfd> {
    if (refusal) throw new FrontendError("NOT_NEGOTIATED", `postcopy refused: ${refusal}`, "POSTCOPY_ADVISE");
    if (this.phase === "advised" || this.phase === "listening")
      throw new FrontendError("BAD_STATE", `postcopy is already ${this.phase}`, "POSTCOPY_ADVISE");
    const r = await conn.request("POSTCOPY_ADVISE", undefined);
    const fd = r?.fds[0];
    for (const extra of r?.fds.slice(1) ?? []) extra.close();
    if (!fd)
      throw new VhostUserError("NACK", "the back-end sent no userfaultfd (it could not open one)", {
        request: "POSTCOPY_ADVISE",
      });
    // A back-end that sends something else (a pipe with made-up fault records) must not get
    // as far as a postcopy whose guest already runs here: check what the fd is first.
    try {
      this.uffd = Userfaultfd.adopt(fd);
    } catch (e) {
      throw new VhostUserError(
        "BAD_FD",
        `the back-end's POSTCOPY_ADVISE fd is not a userfaultfd: ${(e as Error).message}`,
        {
          request: "POSTCOPY_ADVISE",
          cause: e,
        },
      );
    }
    this.phase = "advised";
    return this.uffd;
  }

  async listen(conn: Connection<FrontendRequests>): Promise<void> {
    if (this.phase !== "advised")
      throw new FrontendError("BAD_STATE", `POSTCOPY_LISTEN needs POSTCOPY_ADVISE first (state ${this.phase})`);
    await conn.request("POSTCOPY_LISTEN", undefined);
    this.phase = "listening";
  }

  async end(conn: Connection<FrontendRequests>): Promise<void> {
    if (this.phase !== "advised" && this.phase !== "listening")
      throw new FrontendError("BAD_STATE", `POSTCOPY_END without postcopy (state ${this.phase})`);
    try {
      const r = await conn.request("POSTCOPY_END", undefined);
      const status = r?.payload ?? 0n;
      if (status !== 0n)
        throw new VhostUserError("NACK", "the back-end reported a failure ending postcopy", {
          request: "POSTCOPY_END",
          value: status,
        });
    } finally {
      this.phase = "ended";
      this.close();
    }
  }

  close(): void {
    this.uffd?.close();
    this.uffd = null;
  }
}
