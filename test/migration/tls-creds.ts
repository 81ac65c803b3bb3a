/**
 * Throwaway TLS credentials for tests and benches, made with the openssl command line in
 * QEMU's x509 layout (ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem,
 * client-key.pem), in a fresh temp directory per call:
 *
 *   good/      the CA, a server certificate for localhost / 127.0.0.1 (and `serverNames`),
 *              a client certificate with CN=source-host
 *   foreign/   the same layout under a second, unrelated CA (its client is not ours)
 *   intruder/  our CA, but the client certificate says CN=intruder (wrong identity)
 *   keys.psk   QEMU's PSK format: `source-host:<hex>` (and `intruder:<hex>` in intruder.psk)
 *
 * EC P-256 keys: generating and handshaking with them costs milliseconds.
 */
import { execFileSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { copyFileSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

export const CLIENT_CN = "source-host";

export interface TestCreds {
  root: string;
  good: string;
  foreign: string;
  intruder: string;
  psk: string;
  intruderPsk: string;
  close(): void;
}

function openssl(args: string[], cwd: string): void {
  execFileSync("openssl", args, { cwd, stdio: ["ignore", "ignore", "pipe"], timeout: 30_000 });
}

function key(dir: string, name: string): void {
  openssl(["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", name], dir);
}

function ca(dir: string, cn: string): void {
  key(dir, "ca-key.pem");
  openssl(
    ["req", "-x509", "-new", "-key", "ca-key.pem", "-out", "ca-cert.pem", "-days", "2", "-subj", `/CN=${cn}`],
    dir,
  );
}

function issue(dir: string, caDir: string, who: "server" | "client", cn: string, ext: string): void {
  key(dir, `${who}-key.pem`);
  openssl(["req", "-new", "-key", `${who}-key.pem`, "-out", `${who}.csr`, "-subj", `/CN=${cn}`], dir);
  writeFileSync(join(dir, `${who}.ext`), ext);
  openssl(
    [
      "x509",
      "-req",
      "-in",
      `${who}.csr`,
      "-CA",
      join(caDir, "ca-cert.pem"),
      "-CAkey",
      join(caDir, "ca-key.pem"),
      "-CAcreateserial",
      "-CAserial",
      join(dir, "ca.srl"),
      "-out",
      `${who}-cert.pem`,
      "-days",
      "2",
      "-extfile",
      `${who}.ext`,
    ],
    dir,
  );
}

/** One credentials directory under `caDir`'s CA (made there when `ownCa`). */
function layout(dir: string, caDir: string, clientCn: string, serverNames: string[]): void {
  mkdirSync(dir, { recursive: true });
  const san = [
    "DNS:localhost",
    "IP:127.0.0.1",
    ...serverNames.map((n) => (/^[\d.]+$/.test(n) ? `IP:${n}` : `DNS:${n}`)),
  ];
  issue(dir, caDir, "server", "localhost", `subjectAltName=${san.join(",")}\nextendedKeyUsage=serverAuth\n`);
  issue(dir, caDir, "client", clientCn, "extendedKeyUsage=clientAuth\n");
  if (dir !== caDir) copyFileSync(join(caDir, "ca-cert.pem"), join(dir, "ca-cert.pem"));
}

export function makeTestCreds(o: { serverNames?: string[] } = {}): TestCreds {
  const root = mkdtempSync(join(tmpdir(), "vmshift-tls-"));
  const names = o.serverNames ?? [];
  try {
    const good = join(root, "good");
    mkdirSync(good);
    ca(good, "vmshift test CA");
    layout(good, good, CLIENT_CN, names);
    const foreign = join(root, "foreign");
    mkdirSync(foreign);
    ca(foreign, "someone else's CA");
    layout(foreign, foreign, CLIENT_CN, names);
    const intruder = join(root, "intruder");
    layout(intruder, good, "intruder", names);
    const psk = join(root, "keys.psk");
    writeFileSync(psk, `${CLIENT_CN}:${randomBytes(32).toString("hex")}\n`, { mode: 0o600 });
    const intruderPsk = join(root, "intruder.psk");
    writeFileSync(intruderPsk, `${CLIENT_CN}:${randomBytes(32).toString("hex")}\n`, { mode: 0o600 });
    return {
      root,
      good,
      foreign,
      intruder,
      psk,
      intruderPsk,
      close: () => rmSync(root, { recursive: true, force: true }),
    };
  } catch (e) {
    rmSync(root, { recursive: true, force: true });
    throw e;
  }
}
