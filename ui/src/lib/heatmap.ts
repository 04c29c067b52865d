// The mix-trace heatmap: layers (rows) × steps (columns), coloured by the LoRA that dominates.

export const PALETTE = ["#e8684a", "#4aa3e8", "#6cc070", "#e8c44a", "#b06ce8", "#e84ab0"];
export const OFF = "#2a2d3a";

export function cellColor(dominant: number): string {
  return dominant < 0 ? OFF : PALETTE[dominant % PALETTE.length];
}

/** Cells to draw: `dominant[step][layer]` → {x: step, y: layer, color}. Large traces are
 * down-sampled to at most `maxRows` layer rows (taking the most common choice per band). */
export function heatmapCells(dominant: number[][], maxRows = 160): { x: number; y: number; color: string }[] {
  const steps = dominant.length;
  if (steps === 0) return [];
  const layers = dominant[0].length;
  const band = Math.max(1, Math.ceil(layers / maxRows));
  const cells: { x: number; y: number; color: string }[] = [];
  for (let s = 0; s < steps; s++) {
    for (let y = 0; y * band < layers; y++) {
      const counts = new Map<number, number>();
      for (let l = y * band; l < Math.min(layers, (y + 1) * band); l++) {
        const d = dominant[s][l];
        counts.set(d, (counts.get(d) ?? 0) + 1);
      }
      let best = -1;
      let bestN = -1;
      for (const [d, n] of counts) {
        if (n > bestN || (n === bestN && d > best)) {
          best = d;
          bestN = n;
        }
      }
      cells.push({ x: s, y, color: cellColor(best) });
    }
  }
  return cells;
}
