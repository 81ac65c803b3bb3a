/**
 * `vmshift probe --socket PATH [--json] [--timeout MS] [--device blk] [--config-size N]`:
 * connects to any vhost-user backend and prints what it offers. It negotiates protocol features
 * (needed for GET_MAX_MEM_SLOTS and GET_CONFIG) but sends no SET_OWNER, memory or rings.
 */
import { parseArgs } from "node:util";
import { type DeviceKind, featureNames, protocolFeatureNames } from "../vhost-user/frontend/features.js";
import { VhostUserFrontend } from "../vhost-user/frontend/frontend.js";
import { ProtocolFeature } from "../vhost-user/protocol/constants.js";

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
  connects to a vhost-user backend and prints its features, protocol features, queue count,
  memory slots and config space. --device names the device-type feature bits.
`;

export async function probeCommand(
  argv: string[],
  out: (line: string) => void = (l) => process.stdout.write(`${l}\n`),
) {
  const { values } = parseArgs({
    args: argv,
    options: {
      socket: { type: "string" },
      json: { type: "boolean", default: false },
      timeout: { type: "string", default: "5000" },
      device: { type: "string" },
      "config-size": { type: "string" },
      help: { type: "boolean", default: false },
    },
  });
  if (values.help) {
    out(PROBE_USAGE.trimEnd());
    return 0;
  }
  const fail = (msg: string) => {
    process.stderr.write(`vmshift probe: ${msg}\n${PROBE_USAGE}`);
    return 2;
  };
  if (!values.socket) return fail("--socket PATH is required");
  const timeoutMs = Number(values.timeout);
  if (!Number.isInteger(timeoutMs) || timeoutMs < 1) return fail("--timeout must be a positive integer (ms)");
  if (values.device !== undefined && values.device !== "blk") return fail("--device must be blk");
  const device = values.device as DeviceKind | undefined;
  const configSize = values["config-size"] === undefined ? undefined : Number(values["config-size"]);
  if (configSize !== undefined && (!Number.isInteger(configSize) || configSize < 1 || configSize > 256))
    return fail("--config-size must be 1..256");

  let r: ProbeResult;
  try {
    r = await probe(values.socket, { timeoutMs, ...(configSize ? { configSize } : {}) });
  } catch (e) {
    process.stderr.write(`vmshift probe: ${values.socket}: ${(e as Error).message}\n`);
    return 1;
  }
  const j = probeJson(r, device);
  if (values.json) {
    out(JSON.stringify(j));
    return 0;
  }
  out(`socket            ${values.socket}`);
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
  return 0;
}
