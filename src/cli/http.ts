/**
 * The small HTTP servers of the CLI (`--metrics`, `--dashboard`): `tcp:HOST:PORT` as QEMU
 * writes it (`tcp::PORT` = every interface, port 0 = one the kernel picks), and the address
 * actually bound, which is what the command prints.
 */
import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import { UsageError } from "./options.js";

export interface TcpSpec {
  /** "" = every interface (QEMU's `tcp::PORT`). */
  host: string;
  port: number;
}

/** `tcp:HOST:PORT`, `tcp::PORT`, `tcp:[::1]:PORT`; UsageError naming the option otherwise. */
export function parseTcpSpec(s: string, option: string): TcpSpec {
  const m = /^tcp:(\[[^\]]*\]|[^:]*):(\d+)$/.exec(s);
  const port = m ? Number(m[2]) : Number.NaN;
  if (!m || !Number.isInteger(port) || port > 65535)
    throw new UsageError(`--${option} must be tcp:HOST:PORT (tcp::PORT for every interface), got '${s}'`);
  return { host: (m[1] as string).replace(/^\[|\]$/g, ""), port };
}

export function urlOf(a: AddressInfo): string {
  const host = a.family === "IPv6" ? `[${a.address}]` : a.address;
  return `http://${host}:${a.port}`;
}

export interface HttpService {
  readonly server: Server;
  /** http://ADDRESS:PORT as bound. */
  readonly url: string;
  close(): Promise<void>;
}

export async function serveHttp(
  spec: TcpSpec,
  handler: (req: IncomingMessage, res: ServerResponse) => void,
): Promise<HttpService> {
  const server = createServer(handler);
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    const done = () => {
      server.off("error", reject);
      resolve();
    };
    if (spec.host === "") server.listen(spec.port, done);
    else server.listen(spec.port, spec.host, done);
  });
  const url = urlOf(server.address() as AddressInfo);
  return {
    server,
    url,
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}
