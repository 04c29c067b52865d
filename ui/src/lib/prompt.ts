// Prompt helpers: `<lora:name:weight>` and textual-inversion embedding autocomplete (A1111
// syntax; embeddings are called by name, as a word) and tag parsing.

export interface Completion {
  /** Start of the text being completed (the `<lora:` opener's position, or the word's start). */
  from: number;
  /** End of the text being completed (the caret). */
  to: number;
  /** What the user typed after `<lora:`, or the word typed so far. */
  query: string;
  /** A `<lora:…>` tag, or an embedding's name (a plain word); absent means lora. */
  kind?: "lora" | "embedding";
}

/** The word being typed just before `caret` (at least two characters, outside any tag),
 *  completed with embedding names. */
export function wordCompletionAt(text: string, caret: number): Completion | null {
  const before = text.slice(0, caret);
  const open = before.lastIndexOf("<");
  if (open >= 0 && !before.slice(open).includes(">")) return null;
  const m = before.match(/[\p{L}\p{N}_\-.]+$/u);
  if (!m || m[0].length < 2) return null;
  return { from: caret - m[0].length, to: caret, query: m[0], kind: "embedding" };
}

/** The `<lora:partial` being typed just before `caret`, if any. */
export function loraCompletionAt(text: string, caret: number): Completion | null {
  const before = text.slice(0, caret);
  const open = before.lastIndexOf("<lora:");
  if (open < 0) return null;
  const typed = before.slice(open + 6);
  // Closed already, or past the name (a weight is being typed): nothing to complete.
  if (typed.includes(">") || typed.includes(":") || /\s/.test(typed)) return null;
  return { from: open, to: caret, query: typed };
}

/** Names matching `query`: prefix matches first, then substring matches, case-insensitive. */
export function rankNames(names: string[], query: string, limit = 8): string[] {
  const q = query.toLowerCase();
  const prefix = names.filter((n) => n.toLowerCase().startsWith(q));
  const inner = names.filter((n) => !n.toLowerCase().startsWith(q) && n.toLowerCase().includes(q));
  return [...prefix.sort(), ...inner.sort()].slice(0, limit);
}

/** Replaces the completion with a full tag (or the embedding's name); returns the new text
 *  and caret. */
export function applyCompletion(text: string, c: Completion, name: string, weight = 1): { text: string; caret: number } {
  if (c.kind === "embedding") {
    const out = text.slice(0, c.from) + name + text.slice(c.to);
    return { text: out, caret: c.from + name.length };
  }
  const tag = `<lora:${name}:${weight}>`;
  const after = text.slice(c.to);
  // Swallow the rest of a half-typed tag (up to and including its '>').
  const close = after.match(/^[^\s<>]*>/);
  const rest = close ? after.slice(close[0].length) : after;
  const out = text.slice(0, c.from) + tag + rest;
  return { text: out, caret: c.from + tag.length };
}

/** `<lora:name:w>` tags in a prompt. */
export function loraTags(text: string): { name: string; weight: number }[] {
  const out: { name: string; weight: number }[] = [];
  for (const m of text.matchAll(/<lora:([^:<>]+)(?::([-+]?[0-9]*\.?[0-9]+))?>/g)) {
    out.push({ name: m[1], weight: m[2] === undefined ? 1 : Number(m[2]) });
  }
  return out;
}
