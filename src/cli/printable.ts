/**
 * Text that came from a peer (a migration destination's FAIL message, an error that quotes
 * one) on its way to a terminal or a log: a hostile peer must not reach the terminal with
 * escape sequences (cursor moves, title changes, OSC 52 clipboard writes) or flood it.
 */

/** C0 controls but tab, DEL, C1 controls, and the bidi/line controls that reorder what is shown. */
// biome-ignore lint/suspicious/noControlCharactersInRegex: these are exactly the characters it escapes
const UNPRINTABLE = /[\u0000-\u0008\u000b-\u001f\u007f-\u009f\u2028\u2029\u202a-\u202e\u2066-\u2069]/g;

/** Longest peer text shown (characters); the rest is counted, not printed. */
export const MAX_PEER_TEXT = 2000;

function escapeChar(c: string): string {
  const n = c.charCodeAt(0);
  return n <= 0xff ? `\\x${n.toString(16).padStart(2, "0")}` : `\\u${n.toString(16).padStart(4, "0")}`;
}

/** `s` with every control character escaped (\x1b, \u202e...), cut to `max` characters. */
export function printable(s: unknown, max = MAX_PEER_TEXT): string {
  const text = String(s ?? "");
  const cut = text.length > max ? text.slice(0, max) : text;
  const out = cut.replace(/\n/g, "\\n").replace(UNPRINTABLE, escapeChar);
  return text.length > max ? `${out}… (${text.length - max} more characters)` : out;
}

/**
 * JSON.stringify for lines that carry peer text: strings cut to MAX_PEER_TEXT, and the
 * characters JSON leaves raw but a terminal acts on (C1, DEL, bidi controls) escaped as \uXXXX
 * (still valid JSON, the same string once parsed).
 */
export function safeJson(o: unknown): string {
  const json = JSON.stringify(o, (_k, v: unknown) =>
    typeof v === "string" && v.length > MAX_PEER_TEXT ? `${v.slice(0, MAX_PEER_TEXT)}…` : v,
  );
  return json.replace(
    /[\u007f-\u009f\u2028\u2029\u202a-\u202e\u2066-\u2069]/g,
    (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, "0")}`,
  );
}

/** "1 round", "3 rounds": a count with its noun, singular for exactly one. */
export function counted(n: number, noun: string): string {
  return `${n} ${noun}${n === 1 ? "" : "s"}`;
}
