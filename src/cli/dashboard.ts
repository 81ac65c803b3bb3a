/**
 * The live dashboard of a migration (`--dashboard tcp:HOST:PORT`): a page that follows the
 * versioned events over server-sent events. `/` is the page, `/events` the stream (every event
 * so far first, so a late browser sees the whole run), `/state` the latest `info` of each side
 * as JSON (query-migrate, over HTTP). It outlives the migration: the final report stays up
 * until the command is cancelled.
 */
import type { ServerResponse } from "node:http";
import { DASHBOARD_PAGE } from "./dashboard-page.js";
import { type HttpService, serveHttp, type TcpSpec } from "./http.js";

/** Events kept for a browser that connects late (round events carry their heat map row). */
const MAX_HISTORY = 5000;

export class Dashboard {
  readonly #http: HttpService;
  readonly #clients = new Set<ServerResponse>();
  readonly #history: string[] = [];
  readonly #state: Record<string, unknown> = {};
  readonly #connectWaiters: (() => void)[] = [];
  #closed = false;

  private constructor(http: HttpService) {
    this.#http = http;
  }

  get url(): string {
    return this.#http.url;
  }

  static async serve(spec: TcpSpec): Promise<Dashboard> {
    let self: Dashboard | null = null;
    const http = await serveHttp(spec, (req, res) => {
      const d = self;
      if (!d) return res.writeHead(503).end();
      const path = (req.url ?? "/").split("?")[0];
      if (req.method !== "GET") return res.writeHead(405).end();
      if (path === "/") {
        res.writeHead(200, { "content-type": "text/html; charset=utf-8", "cache-control": "no-store" });
        return res.end(DASHBOARD_PAGE);
      }
      if (path === "/state") {
        res.writeHead(200, { "content-type": "application/json" });
        return res.end(JSON.stringify(d.#state));
      }
      if (path === "/events") return d.#subscribe(res);
      res.writeHead(404, { "content-type": "text/plain" }).end("not found\n");
    });
    self = new Dashboard(http);
    return self;
  }

  #subscribe(res: ServerResponse): void {
    res.writeHead(200, {
      "content-type": "text/event-stream",
      "cache-control": "no-store",
      connection: "keep-alive",
    });
    for (const l of this.#history) res.write(l);
    this.#clients.add(res);
    res.on("close", () => this.#clients.delete(res));
    for (const w of this.#connectWaiters.splice(0)) w();
  }

  /** Resolves once a browser has the event stream open (`--dashboard-wait`). */
  waitForClient(signal?: AbortSignal): Promise<void> {
    if (this.#clients.size > 0) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const onAbort = () => reject(signal?.reason);
      signal?.addEventListener("abort", onAbort, { once: true });
      this.#connectWaiters.push(() => {
        signal?.removeEventListener("abort", onAbort);
        resolve();
      });
    });
  }

  /** One versioned event to every browser (and to the history). */
  publish(e: { event: string; role?: string; info?: unknown }): void {
    if (this.#closed) return;
    if (e.info !== undefined) this.#state[e.role ?? "source"] = e.info;
    const line = `data: ${JSON.stringify(e)}\n\n`;
    this.#history.push(line);
    if (this.#history.length > MAX_HISTORY) this.#history.splice(1, this.#history.length - MAX_HISTORY);
    for (const c of this.#clients) c.write(line);
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    for (const c of this.#clients) c.end();
    this.#clients.clear();
    await this.#http.close();
  }
}
