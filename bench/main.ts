/**
 * `npm run bench -- NAME [--json]`: runs bench/NAME.ts. Each benchmark module exports
 * `run(): Promise<Figure[]>`; add one by adding a line to `benchmarks`.
 */
import { type Figure, printJson, printTable } from "./report.js";

export interface Benchmark {
  run(): Promise<Figure[]>;
}

const benchmarks: Record<string, () => Promise<Benchmark>> = {
  dirty: () => import("./dirty.js"),
  fs: () => import("./fs.js"),
  blk: () => import("./blk.js"),
  kvm: () => import("./kvm.js"),
  migrate: () => import("./migrate.js"),
  vhost: () => import("./vhost.js"),
};

const args = process.argv.slice(2);
const json = args.includes("--json");
const names = args.filter((a) => !a.startsWith("--"));
if (names.length === 0 || names.some((n) => !(n in benchmarks))) {
  process.stderr.write(`usage: npm run bench -- NAME... [--json]\nbenchmarks: ${Object.keys(benchmarks).join(", ")}\n`);
  process.exit(2);
}
for (const name of names) {
  const load = benchmarks[name] as () => Promise<Benchmark>;
  const figures = await (await load()).run();
  if (json) printJson(figures);
  else {
    process.stdout.write(`\n== ${name} (medians) ==\n`);
    printTable(figures);
  }
}
