// Typed wrappers over the app's commands. Progress arrives on Tauri channels.
import { Channel, invoke } from "@tauri-apps/api/core";
import type {
  AdapterView, ApiSettings, ApiStatus, AppInfo, BatchRequest, BatchSummary, ChatStats, EmbeddingEntry, ExtrasSettings, GalleryItem, ImportEvent, JobEvent, LoraEntry,
  MixerTrainReport, MixerTrainRequest, MixerTrainStep, MixerView, ModelEntry, Settings, SubspaceMember,
  SubspaceSummary, TrainEvent, TrainReport, TrainRequest,
} from "./types";

export const api = {
  appInfo: () => invoke<AppInfo>("app_info"),
  libraryList: (query: { text?: string; role?: string; base?: string; tag?: string }) =>
    invoke<LoraEntry[]>("library_list", { query }),
  libraryImport: (paths: string[], onEvent: (e: ImportEvent) => void) => {
    const ch = new Channel<ImportEvent>();
    ch.onmessage = onEvent;
    return invoke<{ added: number; existing: number; failed: number }>("library_import", { paths, onEvent: ch });
  },
  libraryUpdate: (key: string, update: { role?: string; tags?: string[]; name?: string }) =>
    invoke<LoraEntry>("library_update", { key, update }),
  libraryRemove: (key: string) => invoke<LoraEntry>("library_remove", { key }),
  apiStatus: () => invoke<ApiStatus>("api_status"),
  apiStart: (settings: ApiSettings) => invoke<ApiStatus>("api_start", { settings }),
  apiStop: () => invoke<ApiStatus>("api_stop"),
  embeddingList: () => invoke<EmbeddingEntry[]>("embedding_list"),
  embeddingRemove: (key: string) => invoke<EmbeddingEntry>("embedding_remove", { key }),
  libraryTrain: (request: TrainRequest, onEvent: (e: TrainEvent) => void) => {
    const ch = new Channel<TrainEvent>();
    ch.onmessage = onEvent;
    return invoke<TrainReport>("library_train", { request, onEvent: ch });
  },
  libraryTrainStop: () => invoke<boolean>("library_train_stop"),
  subspaceList: () => invoke<SubspaceSummary[]>("subspace_list"),
  subspaceReplace: (name: string, maxError: number) => invoke<SubspaceMember[]>("subspace_replace", { name, maxError }),
  subspaceRestore: (name: string) => invoke<number>("subspace_restore", { name }),
  grid: (settings: Settings, axes: { x: string; y: string; z: string }, onEvent: (e: JobEvent) => void) => {
    const ch = new Channel<JobEvent>();
    ch.onmessage = onEvent;
    return invoke<number>("studio_grid", { settings, x: axes.x, y: axes.y || null, z: axes.z || null, onEvent: ch });
  },
  generate: (settings: Settings, onEvent: (e: JobEvent) => void) => {
    const ch = new Channel<JobEvent>();
    ch.onmessage = onEvent;
    return invoke<number>("studio_generate", { settings, onEvent: ch });
  },
  cancel: (job: number) => invoke<boolean>("studio_cancel", { job }),
  galleryList: () => invoke<GalleryItem[]>("gallery_list"),
  galleryImage: (path: string) => invoke<string>("gallery_image", { path }),
  studioImage: (path: string) => invoke<{ data_url: string; width: number; height: number }>("studio_image", { path }),
  saveMask: (dataUrl: string) => invoke<string>("studio_save_mask", { dataUrl }),
  pngSettings: (path: string) => invoke<Settings>("gallery_settings", { path }),
  exportImages: (request: { images: string[]; dest: string; template: string; zip: boolean; manifest?: boolean }) =>
    invoke<string[]>("gallery_export", { request }),
  galleryExtras: (paths: string[], settings: ExtrasSettings) => invoke<string[]>("gallery_extras", { paths, settings }),
  modelList: () => invoke<ModelEntry[]>("model_list"),
  modelDownload: (repo: string, onEvent: (e: { kind: string; message?: string }) => void) => {
    const ch = new Channel<{ kind: string; message?: string }>();
    ch.onmessage = onEvent;
    return invoke<string>("model_download", { repo, onEvent: ch });
  },
  llmLoad: (model: string) => invoke<{ model: string; has_chat_template: boolean }>("llm_load", { model }),
  llmAddAdapter: (dir: string) => invoke<AdapterView>("llm_add_adapter", { dir }),
  llmSend: (text: string, invoke_: string | null, onToken: (t: string) => void) => {
    const ch = new Channel<{ kind: string; text: string }>();
    ch.onmessage = (e) => onToken(e.text);
    return invoke<ChatStats>("llm_send", { text, invoke: invoke_, maxNewTokens: 256, onEvent: ch });
  },
  llmReset: () => invoke<void>("llm_reset"),
  llmMixerTrain: (request: MixerTrainRequest, onStep: (s: MixerTrainStep) => void) => {
    const ch = new Channel<MixerTrainStep>();
    ch.onmessage = onStep;
    return invoke<MixerTrainReport>("llm_mixer_train", { request, onEvent: ch });
  },
  llmMixerLoad: (dir: string) => invoke<MixerView>("llm_mixer_load", { dir }),
  llmMixerOff: () => invoke<void>("llm_mixer_off"),
  llmBatch: (request: BatchRequest, onProgress: (p: { done: number; total: number }) => void) => {
    const ch = new Channel<{ done: number; total: number }>();
    ch.onmessage = onProgress;
    return invoke<BatchSummary>("llm_batch", { request, onEvent: ch });
  },
  llmChameleonTrain: (data: string, out: string, onStep: (s: { step: number; steps: number; loss: number }) => void) => {
    const ch = new Channel<{ step: number; steps: number; loss: number }>();
    ch.onmessage = onStep;
    return invoke<{ out: string; examples: number; trainable: number; steps: number; seconds: number; final_loss: number }>(
      "llm_chameleon_train", { data, out, onEvent: ch });
  },
};
