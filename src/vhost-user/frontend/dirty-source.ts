import type { DirtySink, DirtySource } from "../../memory/dirty-source.js";
import type { VhostUserFrontend } from "./frontend.js";

/**
 * A backend's writes to guest memory, as a DirtySource: start() turns logging on (SET_LOG_BASE,
 * VHOST_F_LOG_ALL, VHOST_VRING_F_LOG), sync() takes and clears the log's bits, stop() turns
 * logging off. Replacing the log (frontend.replaceLog) keeps this source valid.
 */
export class VhostUserLogSource implements DirtySource {
  readonly name: string;
  readonly #frontend: VhostUserFrontend;
  readonly #guestBytes: number | undefined;

  constructor(frontend: VhostUserFrontend, options: { guestBytes?: number; name?: string } = {}) {
    this.#frontend = frontend;
    this.#guestBytes = options.guestBytes;
    this.name = options.name ?? `vhost-user log (${frontend.connection.label})`;
  }

  async start(): Promise<void> {
    const log = this.#frontend.log ?? (await this.#frontend.startLogging(this.#guestBytes));
    log.start();
  }

  sync(sink: DirtySink): void {
    this.#frontend.log?.sync(sink);
  }

  async stop(): Promise<void> {
    await this.#frontend.stopLogging();
  }
}
