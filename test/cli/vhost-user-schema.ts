/**
 * The definitions of QEMU's docs/interop/vhost-user.json (QEMU 10) that a back-end program's
 * output must satisfy, as data, and a validator with QAPI's rules: enum values from the list,
 * struct members required unless marked optional ('*'), no member the type does not define.
 *
 * VHostUserBackendCapabilities is a union on 'type' whose branch list names only 'input' and
 * 'gpu'; VHostUserBackendCapabilitiesBlock ("Capabilities reported by vhost user "block"
 * backends", since 5.0) is the block branch by its name, and what QEMU's own
 * contrib/vhost-user-blk prints. Each type's capabilities struct is found by that naming.
 */
type TypeRef = string | readonly [string];

const ENUMS: Record<string, readonly string[]> = {
  VHostUserBackendType: [
    "9p",
    "balloon",
    "block",
    "caif",
    "console",
    "crypto",
    "gpu",
    "input",
    "net",
    "rng",
    "rpmsg",
    "rproc-serial",
    "scsi",
    "vsock",
    "fs",
  ],
  VHostUserBackendBlockFeature: ["read-only", "blk-file"],
  VHostUserBackendInputFeature: ["evdev-path", "no-grab"],
  VHostUserBackendGPUFeature: ["render-node", "virgl"],
};

const STRUCTS: Record<string, Record<string, TypeRef>> = {
  VHostUserBackendCapabilitiesBlock: { features: ["VHostUserBackendBlockFeature"] },
  VHostUserBackendCapabilitiesInput: { features: ["VHostUserBackendInputFeature"] },
  VHostUserBackendCapabilitiesGPU: { features: ["VHostUserBackendGPUFeature"] },
  VhostUserBackend: { description: "str", type: "VHostUserBackendType", binary: "str", "*tags": ["str"] },
};

const BRANCHES: Record<string, string> = {
  block: "VHostUserBackendCapabilitiesBlock",
  input: "VHostUserBackendCapabilitiesInput",
  gpu: "VHostUserBackendCapabilitiesGPU",
};

function check(value: unknown, t: TypeRef, at: string, errors: string[]): void {
  if (typeof t !== "string") {
    if (!Array.isArray(value)) return void errors.push(`${at}: not a list`);
    for (const [i, v] of value.entries()) check(v, t[0], `${at}[${i}]`, errors);
    return;
  }
  if (t === "str") {
    if (typeof value !== "string") errors.push(`${at}: not a string`);
    return;
  }
  const e = ENUMS[t];
  if (e) {
    if (typeof value !== "string" || !e.includes(value)) errors.push(`${at}: ${JSON.stringify(value)} is not a ${t}`);
    return;
  }
  const s = STRUCTS[t];
  if (!s) throw new Error(`unknown type ${t}`);
  checkMembers(value, s, at, errors, new Set());
}

function checkMembers(
  value: unknown,
  members: Record<string, TypeRef>,
  at: string,
  errors: string[],
  extra: Set<string>,
): void {
  if (typeof value !== "object" || value === null || Array.isArray(value))
    return void errors.push(`${at}: not an object`);
  const o = value as Record<string, unknown>;
  const known = new Set(extra);
  for (const [k, t] of Object.entries(members)) {
    const optional = k.startsWith("*");
    const name = optional ? k.slice(1) : k;
    known.add(name);
    if (!(name in o)) {
      if (!optional) errors.push(`${at}: missing '${name}'`);
      continue;
    }
    check(o[name], t, `${at}.${name}`, errors);
  }
  for (const k of Object.keys(o)) if (!known.has(k)) errors.push(`${at}: '${k}' is not a member`);
}

/** Errors of `value` as a VHostUserBackendCapabilities (empty = valid). */
export function capabilitiesErrors(value: unknown): string[] {
  const errors: string[] = [];
  const type = (value as { type?: unknown } | null)?.type;
  check(type, "VHostUserBackendType", "type", errors);
  if (errors.length) return errors;
  const branch = BRANCHES[type as string];
  checkMembers(
    value,
    branch ? (STRUCTS[branch] as Record<string, TypeRef>) : {},
    "capabilities",
    errors,
    new Set(["type"]),
  );
  return errors;
}

/** Errors of `value` as a VhostUserBackend descriptor (empty = valid). */
export function descriptorErrors(value: unknown): string[] {
  const errors: string[] = [];
  check(value, "VhostUserBackend", "descriptor", errors);
  return errors;
}
