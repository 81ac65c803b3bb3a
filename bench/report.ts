/** One benchmark figure, side by side with a reference measured in the same run. */
export interface Figure {
  bench: string;
  metric: string;
  unit: string;
  value: number;
  reference: string;
  referenceValue: number;
  /** > 1 means vmshift is better: reference/value for a time, value/reference for a throughput. */
  ratio: number;
}

export type Better = "lower" | "higher";

export function figure(
  bench: string,
  metric: string,
  unit: string,
  better: Better,
  value: number,
  reference: string,
  referenceValue: number,
): Figure {
  const ratio = better === "lower" ? referenceValue / value : value / referenceValue;
  return {
    bench,
    metric,
    unit,
    value: round(value),
    reference,
    referenceValue: round(referenceValue),
    ratio: round(ratio),
  };
}

function round(v: number): number {
  return Number(v.toPrecision(4));
}

export function median(xs: readonly number[]): number {
  if (xs.length === 0) throw new RangeError("median of nothing");
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >>> 1;
  return s.length % 2 ? (s[m] as number) : ((s[m - 1] as number) + (s[m] as number)) / 2;
}

export function printJson(figures: readonly Figure[]): void {
  for (const f of figures) process.stdout.write(`${JSON.stringify(f)}\n`);
}

export function printTable(figures: readonly Figure[]): void {
  const rows = figures.map((f) => [
    f.metric,
    `${f.value} ${f.unit}`,
    `${f.referenceValue} ${f.unit}`,
    `${f.ratio}x`,
    f.reference,
  ]);
  const head = ["metric", "vmshift", "reference", "ratio (>1 = vmshift better)", "reference is"];
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] as string).length)));
  const line = (r: readonly string[]) => r.map((c, i) => c.padEnd(widths[i] as number)).join("  ");
  process.stdout.write(`${line(head)}\n${widths.map((w) => "-".repeat(w)).join("  ")}\n`);
  for (const r of rows) process.stdout.write(`${line(r)}\n`);
}
