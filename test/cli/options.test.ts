/** The option discipline every command shares: typed values, one-line usage errors, --help first. */
import assert from "node:assert/strict";
import { test } from "node:test";
import { parseTcpSpec } from "../../src/cli/http.js";
import { exactlyOne, parseOptions, UsageError } from "../../src/cli/options.js";

const SPECS = {
  size: { type: "integer", default: 64, min: 1, max: 4096, unit: "MiB" },
  rate: { type: "number", default: 0, min: 0 },
  mode: { type: "enum", values: ["precopy", "postcopy"], default: "precopy" },
  file: { type: "string" },
  json: { type: "boolean" },
} as const;

test("typed values: defaults, numbers parsed, enums checked, kebab-case to camelCase", () => {
  const { values } = parseOptions(["--size", "128", "--rate=2.5", "--mode", "postcopy", "--json"], SPECS);
  assert.equal(values.size, 128);
  assert.equal(values.rate, 2.5);
  assert.equal(values.mode, "postcopy");
  assert.equal(values.json, true);
  assert.equal(values.file, undefined);
  assert.equal(values.logLevel, "info");
  assert.equal(values.logFormat, "text");
  const d = parseOptions([], SPECS).values;
  assert.deepEqual([d.size, d.rate, d.mode, d.json], [64, 0, "precopy", false]);
});

for (const [argv, message] of [
  [["--size", "abc"], /--size must be an integer 1\.\.4096 \(MiB\), got 'abc'/],
  [["--size", "1.5"], /--size must be an integer/],
  [["--size", "0"], /--size must be an integer 1\.\.4096 \(MiB\), got 0/],
  [["--size", ""], /--size must be an integer/],
  [["--size", "1e9"], /got 1e9/],
  [["--rate", "-1"], /--rate must be a number >= 0/],
  [["--rate", "Infinity"], /--rate must be a number/],
  [["--mode", "foo"], /--mode must be precopy or postcopy, got 'foo'/],
  [["--bogus"], /unknown option --bogus/],
  [["--size"], /--size needs a value/],
  [["--json=1"], /--json takes no value/],
  [["--file", ""], /--file must not be empty/],
  [["extra"], /unexpected argument 'extra'/],
  [["--log-level", "loud"], /--log-level must be trace, debug, info, warn, error or silent/],
  [["--log-format", "xml"], /--log-format must be text or json/],
] as const) {
  test(`bad input ${JSON.stringify(argv)} is a UsageError of one line`, () => {
    assert.throws(
      () => parseOptions(argv, SPECS),
      (e: unknown) => e instanceof UsageError && message.test(e.message) && !e.message.includes("\n"),
    );
  });
}

test("--help and -h win over bad input (the usage is what a confused user needs)", () => {
  assert.equal(parseOptions(["--size", "abc", "--help"], SPECS).values.help, true);
  assert.equal(parseOptions(["-h"], SPECS).values.help, true);
});

test("positionals only where a command allows them", () => {
  assert.deepEqual(parseOptions(["save", "--file", "x"], SPECS, { positionals: 1 }).positionals, ["save"]);
  assert.throws(() => parseOptions(["save", "again"], SPECS, { positionals: 1 }), /unexpected argument 'again'/);
});

test("exactlyOne names the options", () => {
  assert.equal(exactlyOne({ listen: "x", to: undefined }), "listen");
  assert.throws(() => exactlyOne({ listen: undefined, to: undefined }), /give exactly one of --listen or --to/);
  assert.throws(() => exactlyOne({ listen: "a", to: "b" }), UsageError);
});

test("tcp:HOST:PORT as QEMU writes it: empty host = every interface, IPv6 in brackets", () => {
  assert.deepEqual(parseTcpSpec("tcp:127.0.0.1:9100", "metrics"), { host: "127.0.0.1", port: 9100 });
  assert.deepEqual(parseTcpSpec("tcp::0", "metrics"), { host: "", port: 0 });
  assert.deepEqual(parseTcpSpec("tcp:[::1]:80", "metrics"), { host: "::1", port: 80 });
  for (const bad of ["9100", "tcp:host", "tcp:h:99999", "unix:/x", "tcp:h:-1"])
    assert.throws(() => parseTcpSpec(bad, "metrics"), /--metrics must be tcp:HOST:PORT/);
});
