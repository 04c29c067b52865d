import { describe, expect, it } from "vitest";
import { formatBytes, formatError, formatEta, formatRate, jobFraction, previewTemplate, replaceable } from "./format";
import { cellColor, heatmapCells, OFF, PALETTE } from "./heatmap";

describe("progress formatting", () => {
  it("formats ETA", () => {
    expect(formatEta(5.4)).toBe("5s");
    expect(formatEta(125)).toBe("2m 05s");
    expect(formatEta(3725)).toBe("1h 02m");
    expect(formatEta(NaN)).toBe("–");
  });
  it("formats rates both ways", () => {
    expect(formatRate(2.5)).toBe("2.50 it/s");
    expect(formatRate(0.25)).toBe("4.00 s/it");
    expect(formatRate(0)).toBe("–");
  });
  it("spreads progress over batches", () => {
    expect(jobFraction(0, 2, 5, 10)).toBeCloseTo(0.25);
    expect(jobFraction(1, 2, 10, 10)).toBe(1);
  });
});

describe("export names", () => {
  it("mirrors the engine's template", () => {
    expect(previewTemplate("{index}-{seed}-{prompt}", 3, 7, "a big/red: circle?")).toBe("00003-7-a_big_red_circle.png");
    expect(previewTemplate("{}", 12, null, "")).toBe("00012.png");
  });
});

describe("heatmap", () => {
  it("colours by dominant LoRA", () => {
    expect(cellColor(-1)).toBe(OFF);
    expect(cellColor(1)).toBe(PALETTE[1]);
  });
  it("down-samples layers into bands by majority", () => {
    const dominant = [[0, 0, 1, 1, 1, -1]];
    const cells = heatmapCells(dominant, 3);
    expect(cells.map((c) => c.color)).toEqual([PALETTE[0], PALETTE[1], PALETTE[1]]);
    expect(heatmapCells([], 3)).toEqual([]);
  });
  it("shades bands by their soft weight", () => {
    const cells = heatmapCells([[0, 0, 1, 1]], 2, [[100, 50, 20, 20]]);
    expect(cells.map((c) => c.alpha)).toEqual([0.75, 0.2]);
    expect(heatmapCells([[0]], 2)[0].alpha).toBe(1);
  });
});

describe("subspace formatting", () => {
  it("formats bytes, errors and the replaceable count", () => {
    expect(formatBytes(512)).toBe("512 B");
    expect(formatBytes(2048)).toBe("2.0 KB");
    expect(formatBytes(3 * 1024 * 1024)).toBe("3.0 MB");
    expect(formatError(0.1234)).toBe("12%");
    expect(formatError(1.3e-8)).toBe("1.3e-6%");
    const ms = [{ error: 0.01, original_present: true }, { error: 0.2, original_present: true }, { error: 0.0, original_present: false }];
    expect(replaceable(ms, 0.05)).toBe(1);
    expect(replaceable(ms, 0.5)).toBe(2);
  });
});

describe("restoring a record", () => {
  it("resets what the record leaves out to the engine's defaults", async () => {
    const { defaultSettings, restoreSettings } = await import("./types");
    const current = { ...defaultSettings(), subseed: 7, subseed_strength: 0.5, batch_seeds: "per_image" as const, clip_skip: 1 };
    const restored = restoreSettings(current, { prompt: "a cat", seed: 3 });
    expect(restored.subseed_strength).toBe(0);
    expect(restored.subseed).toBeNull();
    expect(restored.batch_seeds).toBe("shared");
    expect(restored.clip_skip).toBe(0);
    expect(restoreSettings({ ...current, tiling: "x" }, { prompt: "a cat" }).tiling).toBe("");
    expect(restoreSettings({ ...current, seed_resize_from_w: 512 }, { prompt: "a cat" }).seed_resize_from_w).toBe(0);
    expect(restored.prompt).toBe("a cat");
    expect(restored.model).toBe(current.model);
  });
});
