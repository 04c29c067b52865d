// App-wide state shared by the panes (Svelte 5 runes).
import { defaultSettings, type AppInfo, type EmbeddingEntry, type GalleryItem, type LoraEntry, type MixSummary, type Settings } from "./types";

export interface JobView {
  id: number;
  label: string;
  status: "queued" | "running" | "done" | "cancelled" | "failed";
  step: number;
  steps: number;
  batch: number;
  batches: number;
  its: number;
  eta: number;
  message: string;
}

export const app = $state({
  tab: "studio" as "studio" | "library" | "gallery" | "chat",
  info: null as AppInfo | null,
  settings: defaultSettings() as Settings,
  seedLocked: false,
  library: [] as LoraEntry[],
  /** Textual-inversion embeddings in the library, for the prompt autocomplete. */
  embeddings: [] as EmbeddingEntry[],
  gallery: [] as GalleryItem[],
  jobs: [] as JobView[],
  preview: null as string | null,
  lastTrace: null as MixSummary | null,
  toast: "" as string,
});

export function notify(msg: string) {
  app.toast = msg;
  setTimeout(() => {
    if (app.toast === msg) app.toast = "";
  }, 5000);
}

export function addLoraToMix(name: string, role: string | null) {
  if (app.settings.loras.some((l) => l.name === name)) return;
  app.settings.loras.push({ name, weight: 1, role: role && role !== "unknown" ? role : null });
}
