// Mirrors of the Rust types the commands exchange (src/studio/, src/lora/library/, src-tauri/src/commands.rs).

export interface LoraSetting {
  name: string;
  weight: number;
  role?: string | null;
  /** What follows the name in a <lora:NAME:...> tag: te/unet, loractl keyframes, lbw. */
  schedule?: string | null;
}

/** img2img / inpainting inputs with A1111's names (src/studio/settings.rs InitSettings). */
export interface InitSettings {
  image: string;
  strength: number;
  mask?: string | null;
  mask_blur: number;
  masked_content: "original" | "fill" | "latent_noise" | "latent_nothing";
  inpaint_area: "whole_picture" | "only_masked";
  padding: number;
  outpaint?: [number, number, number, number] | null;
  /** A1111's "Resize mode" for an init image of another shape. */
  resize_mode?: "just_resize" | "crop_and_resize" | "resize_and_fill" | "just_resize_latent_upscale";
}

export function defaultInit(image: string): InitSettings {
  return { image, strength: 0.75, mask: null, mask_blur: 4, masked_content: "original", inpaint_area: "whole_picture", padding: 32, resize_mode: "just_resize" };
}

/** One ControlNet unit with sd-webui-controlnet's names (src/studio/settings.rs ControlNetSetting). */
export interface ControlNetSetting {
  /** A diffusers ControlNet or T2I-Adapter folder, one .safetensors in diffusers names, or a hub repo id. */
  model: string;
  /** The picture the preprocessor reads (the control map itself with "none"). */
  image: string;
  /** The preprocessor ("Module"). */
  module: "none" | "canny" | "invert";
  /** "Control Weight". */
  weight: number;
  /** "Starting / Ending Control Step", fractions of the steps. */
  guidance_start: number;
  guidance_end: number;
  resize_mode: "just_resize" | "crop_and_resize" | "resize_and_fill";
  /** canny: low and high thresholds; null = 100 and 200. */
  threshold_a?: number | null;
  threshold_b?: number | null;
  /** sd-webui-controlnet's "Control Mode": Balanced, "My prompt is more important", "ControlNet is more important". */
  control_mode?: "balanced" | "prompt" | "control";
}

export function defaultControlUnit(): ControlNetSetting {
  return { model: "", image: "", module: "none", weight: 1, guidance_start: 0, guidance_end: 1, resize_mode: "crop_and_resize", threshold_a: null, threshold_b: null, control_mode: "balanced" };
}

export interface Settings {
  model: string;
  prompt: string;
  negative_prompt: string;
  steps: number;
  cfg: number;
  sampler: string;
  /** karras | exponential | beta | sgm_uniform | ays; "" = the sampler's own. */
  schedule?: string;
  /** diffusers' clip_skip (0 = SDXL's penultimate layer). */
  clip_skip?: number;
  /** Seamless (tileable) images: "xy" (A1111's Tiling), "x" or "y" (one axis); "" = off. */
  tiling?: string;
  /** diffusers' timestep_spacing over the model's (trailing: Lightning / Turbo / Hyper-SD); "" = the model's. */
  timestep_spacing?: string;
  /** A VAE folder or .safetensors in place of the model's; "" = the model's. */
  vae?: string;
  seed: number | null;
  /** A1111's variation seed: with a strength above 0 the starting noise moves toward this seed's; null = random. */
  subseed?: number | null;
  /** "Variation seed strength", 0 (off) to 1. */
  subseed_strength?: number;
  /** A1111's "Resize seed from width / height" in pixels; 0 = off. */
  seed_resize_from_w?: number;
  seed_resize_from_h?: number;
  /** A1111's "Eta noise seed delta" (ENSD): ancestral / SDE noise from seed + this; 0 = off. */
  eta_noise_seed_delta?: number;
  width: number;
  height: number;
  batch_count: number;
  batch_size: number;
  /** "per_image": A1111's seed + k per image of a batch; absent or "shared": one generator
   * for the batch (diffusers; what records made before the choice restore with). */
  batch_seeds?: "shared" | "per_image";
  loras: LoraSetting[];
  mix: string;
  klora_pattern: string | null;
  switch_every: number;
  windows: string | null;
  asymmetric_cfg: boolean;
  klora_others: string | null;
  candidates: boolean;
  init?: InitSettings | null;
  /** A1111's "SD upscale" script over the img2img job: tiles of width × height. */
  sd_upscale?: SdUpscaleSettings | null;
  hires?: HiresSettings | null;
  /** ControlNet units; their guidance adds up. */
  controlnet?: ControlNetSetting[];
}

/** A1111's hires fix (src/studio/settings.rs HiresSettings). */
export interface HiresSettings {
  scale: number;
  upscaler: string;
  steps: number;
  denoise: number;
}

/** A1111's "SD upscale" script (src/studio/settings.rs SdUpscaleSettings). */
export interface SdUpscaleSettings {
  scale: number;
  overlap: number;
  upscaler: string;
}

/** A1111's Extras upscale (the engine's `ExtrasSettings`). */
export type ExtrasResize =
  | { mode: "scale_by"; factor: number; max_side_length: number }
  | { mode: "scale_to"; width: number; height: number; crop: boolean };
export interface ExtrasSettings {
  resize: ExtrasResize;
  upscaler_1: string;
  upscaler_2: string;
  upscaler_2_visibility: number;
  /** Write a whole factor as A1111's tab does (`by: 2`). */
  factor_as_int?: boolean;
}

/** The upscalers SD upscale takes besides the library's models (A1111's pixel upscalers). */
export const PIXEL_UPSCALERS = ["None", "Lanczos", "Nearest"];

export const HIRES_UPSCALERS = ["Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)", "Latent (nearest)", "Latent (nearest-exact)", "None", "Lanczos", "Nearest"];

export interface LoraEntry {
  sha256: string;
  addnet_hash: string;
  file_name: string;
  display_name: string;
  size: number;
  format: string;
  ranks: number[];
  alphas: number[];
  base_model: string;
  module_count: number;
  trigger_words: string[];
  role: string;
  user_tags: string[];
  title: string | null;
  thumbnail: string | null;
  added_at: string;
  path: string;
}

/** The app's local A1111-compatible API switch (saved in <library>/app_settings.json). */
export interface ApiSettings {
  enabled: boolean;
  host: string;
  port: number;
  /** USER:PASS for HTTP Basic, or "". */
  auth: string;
}

export interface ApiStatus {
  running: boolean;
  settings: ApiSettings;
  url: string | null;
}

/** A textual-inversion embedding in the library (src/lora/library/embeddings.rs). */
export interface EmbeddingEntry {
  sha256: string;
  file_name: string;
  display_name: string;
  size: number;
  format: string;
  vectors: number;
  widths: number[];
  thumbnail: string | null;
  added_at: number;
  path: string;
}

/** A member of an EigenLoRAx subspace (src/lora/library/subspaces.rs). */
export interface SubspaceMember {
  display_name: string;
  sha256: string;
  /** Relative ΔW error of the reconstruction, over all modules. */
  error: number;
  module_errors: Record<string, number>;
  original_bytes: number;
  loadings_bytes: number;
  in_basis: boolean;
  original_present: boolean;
  replaced: boolean;
}

export interface SubspaceSummary {
  name: string;
  base_model: string;
  centering: "centred" | "uncentred";
  rule: { fixed: number } | { energy: number };
  storage: "f16" | "f32";
  modules: number;
  file: string;
  components_bytes: number;
  members: SubspaceMember[];
  bytes_before: number;
  bytes_after: number;
  ratio: number;
}

/** A LoRA training job (src/studio/training.rs). */
export interface TrainRequest {
  images: string;
  prompt: string;
  name: string;
  subspace: string | null;
  rank: number;
  steps: number;
  batch: number;
  lr: number;
  seed: number;
  resolution: number | null;
  base: string | null;
  export: string | null;
  restart: boolean;
  checkpoint_every: number;
  model: string;
}

export type TrainEvent =
  | { kind: "started"; what: string; trainable: number; images: number; size: number; steps: number; resumed_at: number }
  | { kind: "step"; step: number; steps: number; loss: number };

export interface TrainReport {
  entry: LoraEntry | null;
  trainable: number;
  steps: number;
  seconds: number;
  final_loss: number;
  loss_curve: number[];
  subspace_error: number | null;
  stopped: boolean;
}

export interface ImportEvent {
  index: number;
  path: string;
  status: "added" | "existing" | "failed";
  message: string | null;
  entry: LoraEntry | null;
}

export interface MixSummary {
  strategy: string;
  loras: string[];
  layers: number;
  steps: number;
  mean_weight: number[];
  dominant: number[][];
  /** Percent of the largest weight, per step and layer (soft weights). */
  intensity?: number[][];
  candidates?: { name: string; role: string; score: number; picked: boolean; reason: string }[];
}

export type StudioEvent =
  | { kind: "loading"; model: string }
  | { kind: "loaded"; model: string; seconds: number }
  | { kind: "lora_loaded"; name: string; role: string; layers: number; warnings: string[] }
  | { kind: "step"; batch: number; batches: number; step: number; steps: number; its: number; eta_seconds: number }
  | { kind: "image"; path: string; seed: number; batch: number; index: number }
  | { kind: "mix_trace"; summary: MixSummary }
  | { kind: "notice"; message: string };

export type JobEvent =
  | { kind: "queued"; job: number; position: number }
  | { kind: "started"; job: number }
  | { kind: "progress"; job: number; event: StudioEvent }
  | { kind: "preview"; job: number; data_url: string }
  | { kind: "done"; job: number; images: string[] }
  | { kind: "cancelled"; job: number }
  | { kind: "failed"; job: number; message: string };

export interface GalleryItem {
  path: string;
  name: string;
  settings: Settings | null;
}

export interface ModelEntry {
  name: string;
  spec: string;
  kind: string;
}

export interface AppInfo {
  version: string;
  library_dir: string;
  gallery_dir: string;
  samplers: [string, string][];
  schedules?: [string, string][];
  strategies: string[];
  size_presets: [number, number][];
  /** ESRGAN-family models in the library's models/ESRGAN (hires fix upscalers). */
  upscaler_models?: string[];
}

export interface AdapterView {
  name: string;
  kind: "lora" | "alora";
  invocation_string: string | null;
  invocation_tokens: number[];
  modules: number;
  path: string;
}

export interface ChatStats {
  text: string;
  tokens: number;
  computed_positions: number;
  reused_positions: number;
  prefilled_positions: number;
  invoked: string | null;
}

export interface MixerTrainRequest {
  adapters: string[];
  data: string;
  out: string;
  top_k: number | null;
  samples: number | null;
}

export interface MixerTrainStep {
  step: number;
  steps: number;
  loss: number;
  task_loss: number;
  balance_loss: number;
}

export interface MixerTrainReport {
  out: string;
  experts: string[];
  routers: number;
  trainable: number;
  samples: number;
  steps: number;
  seconds: number;
  final_loss: number;
  activated: boolean;
}

export interface MixerView {
  experts: string[];
  top_k: number;
  activated: boolean;
  routers: number;
}

export interface BatchRequest {
  prompts: string;
  out: string;
  chameleon: string | null;
  clusters: number | null;
  max_new_tokens: number | null;
}

export interface BatchAnswer {
  index: number;
  line: number;
  prompt: string;
  cluster: number;
  answer: string;
  tokens: number;
}

export interface BatchSummary {
  out: string;
  clusters: number;
  answers: BatchAnswer[];
}

/** What a record leaves out means the engine's default (its JSON skips default fields), not
 * whatever the pane held before: a restore resets those first, so the image is made again. */
const RECORD_DEFAULTS: Partial<Settings> & Record<string, unknown> = {
  schedule: "",
  clip_skip: 0,
  tiling: "",
  timestep_spacing: "",
  vae: "",
  dtype: "",
  encode_empty_negative: false,
  subseed: null,
  subseed_strength: 0,
  seed_resize_from_w: 0,
  seed_resize_from_h: 0,
  eta_noise_seed_delta: 0,
  batch_seeds: "shared",
  klora_mode: null,
  np_mu: null,
  init: null,
  hires: null,
  styles: [],
  embeddings: [],
};

/** The pane's settings after restoring `restored` (a PNG's record) over `current`. */
export function restoreSettings(current: Settings, restored: Partial<Settings>): Settings {
  return { ...current, ...RECORD_DEFAULTS, ...restored } as Settings;
}

export function defaultSettings(): Settings {
  return {
    model: "miniworld",
    prompt: "",
    negative_prompt: "",
    steps: 25,
    cfg: 5,
    sampler: "",
    seed: null,
    width: 0,
    height: 0,
    batch_count: 1,
    batch_size: 1,
    batch_seeds: "per_image",
    loras: [],
    mix: "merge",
    klora_pattern: null,
    switch_every: 5,
    windows: null,
    asymmetric_cfg: false,
    klora_others: null,
    candidates: false,
    schedule: "",
    clip_skip: 0,
    vae: "",
    init: null,
    hires: null,
  };
}
