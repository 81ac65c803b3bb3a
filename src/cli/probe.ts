/**
 * `vmshift probe --socket PATH [--json] [--timeout MS] [--device blk] [--config-size N]`:
 * connects to any vhost-user backend and prints what it offers. It negotiates protocol features
 * (needed for GET_MAX_MEM_SLOTS and GET_CONFIG) but sends no SET_OWNER, memory or rings.
 */
import { type DeviceKind, featureNames, protocolFeatureNames } from "../vhost-user/frontend/features.js";
import { VhostUserFrontend } from "../vhost-user/frontend/frontend.js";
import { ProtocolFeature } from "../vhost-user/protocol/constants.js";
import { required } from "./options.js";
import { defineCommand, EXIT_CANCELLED, EXIT_FAILED, EXIT_OK } from "./runtime.js";

export interface ProbeResult {
  features: bigint;
  /** Offered by GET_PROTOCOL_FEATURES (null without VHOST_USER_F_PROTOCOL_FEATURES). */
  protocolFeatures: bigint | null;
  /** GET_QUEUE_NUM (null without MQ). */
  queues: number | null;
  /** GET_MAX_MEM_SLOTS (null without CONFIGURE_MEM_SLOTS). */
  maxMemSlots: number | null;
  /** GET_CONFIG (null without CONFIG, or when every size tried was refused). */
  config: Uint8Array | null;
}

/** Config sizes tried when none is given: the spec's maximum, then virtio-blk's 60 bytes. */
const DEFAULT_CONFIG_SIZES = [256, 60];

export async function probe(
  socketPath: string,
  options: { timeoutMs?: number; configSize?: number } = {},
): Promise<ProbeResult> {
  const fe = VhostUserFrontend.connect(socketPath, options.timeoutMs ? { timeoutMs: options.timeoutMs } : {});
  try {
    const n = await fe.negotiate();
    const queues = fe.hasProtocolFeature(ProtocolFeature.MQ) ? await fe.getQueueNum() : null;
    const maxMemSlots = fe.hasProtocolFeature(ProtocolFeature.CONFIGURE_MEM_SLOTS) ? await fe.getMaxMemSlots() : null;
    let config: Uint8Array | null = null;
    if (fe.hasProtocolFeature(ProtocolFeature.CONFIG)) {
      for (const size of options.configSize ? [options.configSize] : DEFAULT_CONFIG_SIZES) {
        try {
          config = await fe.getConfig(0, size);
          break;
        } catch (e) {
          // An empty reply is the backend saying "not this size"; anything else is fatal.
          if ((e as { code?: string }).code !== "NACK") throw e;
        }
      }
    }
    return { features: n.features, protocolFeatures: n.offeredProtocolFeatures, queues, maxMemSlots, config };
  } finally {
    fe.close();
  }
}

const hex64 = (v: bigint) => `0x${v.toString(16).padStart(16, "0")}`;
const hexBytes = (b: Uint8Array) => Buffer.from(b.buffer, b.byteOffset, b.byteLength).toString("hex");

/** The `--json` object. */
export function probeJson(r: ProbeResult, device?: DeviceKind): Record<string, unknown> {
  return {
    features: hex64(r.features),
    featureNames: featureNames(r.features, device),
    protocolFeatures: r.protocolFeatures === null ? null : hex64(r.protocolFeatures),
    protocolFeatureNames: r.protocolFeatures === null ? [] : protocolFeatureNames(r.protocolFeatures),
    queues: r.queues,
    maxMemSlots: r.maxMemSlots,
    config: r.config === null ? null : hexBytes(r.config),
    configSize: r.config === null ? null : r.config.length,
  };
}

export const PROBE_USAGE = `usage: vmshift probe --socket PATH [--json] [--timeout MS] [--device blk] [--config-size N]
  connects to a vhost-user back-end and prints its features, protocol features, queue count,
  memory slots and config space (it negotiates features but sets up no memory or rings)
  --socket PATH      the back-end's unix socket
  --json             one JSON object on stdout
  --timeout MS       give up on a silent back-end after this long (default 5000)
  --device blk       name the device-type feature bits too
  --config-size N    bytes of config space to ask for, 1..256 (default: 256, then 60)
exit status: 0 probed, 1 the back-end could not be probed, 2 bad usage, 130 cancelled (SIGINT)`;

const probeDef = (out?: (line: string) => void) =>
  defineCommand({
    name: "probe",
    usage: PROBE_USAGE,
    options: {
      socket: { type: "string" },
      json: { type: "boolean" },
      timeout: { type: "integer", default: 5000, min: 1, max: 600_000, unit: "ms" },
      device: { type: "enum", values: ["blk"] },
      "config-size": { type: "integer", min: 1, max: 256 },
    },
    async run(v, ctx) {
      const write = out ?? ctx.out;
      const socket = required(v.socket, "socket", "PATH");
      const device = v.device as DeviceKind | undefined;
      const running = probe(socket, { timeoutMs: v.timeout, ...(v.configSize ? { configSize: v.configSize } : {}) });
      running.catch(() => undefined);
      const cancelled = new Promise<null>((r) => ctx.signal.addEventListener("abort", () => r(null), { once: true }));
      let r: ProbeResult | null;
      try {
        r = await Promise.race([running, cancelled]);
      } catch (e) {
        ctx.log.error({ socket }, `${socket}: ${(e as Error).message}`);
        return EXIT_FAILED;
      }
      if (r === null) return EXIT_CANCELLED;
      printProbe(r, socket, device, v.json, write);
      return EXIT_OK;
    },
  });

/** `vmshift probe ARGS`; `out` receives stdout's lines (tests). */
export function probeCommand(argv: string[], out?: (line: string) => void): Promise<number> {
  return probeDef(out)(argv);
}

function printProbe(
  r: ProbeResult,
  socket: string,
  device: DeviceKind | undefined,
  json: boolean,
  out: (line: string) => void,
): void {
  const j = probeJson(r, device);
  if (json) {
    out(JSON.stringify(j));
    return;
  }
  out(`socket            ${socket}`);
  out(`features          ${j.features}`);
  out(`                  ${(j.featureNames as string[]).join(" ")}`);
  out(`protocol features ${j.protocolFeatures ?? "(not offered: no VHOST_USER_F_PROTOCOL_FEATURES)"}`);
  if (r.protocolFeatures !== null) out(`                  ${(j.protocolFeatureNames as string[]).join(" ")}`);
  out(`queues            ${r.queues ?? "(no MQ)"}`);
  out(`max mem slots     ${r.maxMemSlots ?? "(no CONFIGURE_MEM_SLOTS)"}`);
  if (r.config === null) out("config            (no CONFIG)");
  else {
    out(`config            ${r.config.length} bytes`);
    for (let i = 0; i < r.config.length; i += 16) {
      out(
        `  ${i.toString(16).padStart(4, "0")}  ${hexBytes(r.config.subarray(i, i + 16))
          .replace(/(..)/g, "$1 ")
          .trim()}`,
      );
    }
  }
}
