// Small formatting helpers for progress and the gallery.

export function formatEta(seconds: number): string {
  if (!isFinite(seconds) || seconds < 0) return "–";
  const s = Math.round(seconds);
  if (s < 60) return `${s}s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m ${String(s % 60).padStart(2, "0")}s`;
  return `${Math.floor(m / 60)}h ${String(m % 60).padStart(2, "0")}m`;
}

export function formatRate(its: number): string {
  if (!isFinite(its) || its <= 0) return "–";
  return its >= 1 ? `${its.toFixed(2)} it/s` : `${(1 / its).toFixed(2)} s/it`;
}

/** Overall progress of a job in [0, 1] across batches. */
export function jobFraction(batch: number, batches: number, step: number, steps: number): number {
  if (batches <= 0 || steps <= 0) return 0;
  return Math.min(1, (batch + step / steps) / batches);
}

/** A preview of an export file name (the engine does the same substitution). */
export function previewTemplate(template: string, index: number, seed: number | null, prompt: string): string {
  const safe = (s: string) =>
    s
      .replace(/[^\p{L}\p{N}_-]/gu, "_")
      .split("_")
      .filter((p) => p.length > 0)
      .join("_")
      .slice(0, 60);
  const out = template
    .split("{index}").join(String(index).padStart(5, "0"))
    .split("{seed}").join(seed === null ? "" : String(seed))
    .split("{prompt}").join(safe(prompt));
  const name = safe(out.replace(/[{}]/g, ""));
  return (name.length > 0 ? name : String(index).padStart(5, "0")) + ".png";
}

/** Bytes as B / KB / MB (powers of 1024, one decimal). */
export function formatBytes(n: number): string {
  if (!isFinite(n) || n < 0) return "–";
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KB`;
  return `${(n / (1024 * 1024)).toFixed(1)} MB`;
}

/** A relative error as a percentage with two significant digits (tiny errors in exponent form). */
export function formatError(e: number): string {
  if (!isFinite(e)) return "–";
  if (e > 0 && e < 1e-4) return `${(e * 100).toExponential(1)}%`;
  return `${(e * 100).toPrecision(2)}%`;
}

/** The members "Replace originals" would take at this threshold: under it, original present. */
export function replaceable(members: { error: number; original_present: boolean }[], maxError: number): number {
  return members.filter((m) => m.original_present && m.error <= maxError).length;
}
