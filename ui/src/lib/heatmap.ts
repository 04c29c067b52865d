// The mix-trace heatmap: layers (rows) × steps (columns), coloured by the LoRA that dominates.

export const PALETTE = ["#e8684a", "#4aa3e8", "#6cc070", "#e8c44a", "#b06ce8", "#e84ab0"];
export const OFF = "#2a2d3a";

export function cellColor(dominant: number): string {
  return dominant < 0 ? OFF : PALETTE[dominant % PALETTE.length];
}

/** Cells to draw: `dominant[step][layer]` → {x: step, y: layer, color, alpha}. Large traces are
 * down-sampled to at most `maxRows` layer rows (taking the most common choice per band); `alpha`
 * is the band's mean soft weight (`intensity`, percent), 1 without one. */
export function heatmapCells(
  dominant: number[][],
  maxRows = 160,
  intensity?: number[][],
): { x: number; y: number; color: string; alpha: number }[] {
  const steps = dominant.length;
  if (steps === 0) return [];
  const layers = dominant[0].length;
  const band = Math.max(1, Math.ceil(layers / maxRows));
  const cells: { x: number; y: number; color: string; alpha: number }[] = [];
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
      let alpha = 1;
      if (intensity && intensity[s]) {
        let sum = 0;
        let n = 0;
        for (let l = y * band; l < Math.min(layers, (y + 1) * band); l++) {
          sum += intensity[s][l] ?? 100;
          n++;
        }
        alpha = n > 0 ? Math.max(0.15, sum / n / 100) : 1;
      }
      cells.push({ x: s, y, color: cellColor(best), alpha });
    }
  }
  return cells;
}
