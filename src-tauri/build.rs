/// The app's own commands. Each gets an `allow-<command>` permission from the app manifest; the
/// main window's capability (capabilities/main.json) grants exactly these plus `core:default`.
const COMMANDS: &[&str] = &[
    "app_info",
    "library_list",
    "library_import",
    "library_update",
    "library_remove",
    "library_train",
    "library_train_stop",
    "subspace_list",
    "subspace_replace",
    "subspace_restore",
    "studio_generate",
    "studio_grid",
    "studio_cancel",
    "gallery_list",
    "gallery_image",
    "studio_image",
    "studio_save_mask",
    "gallery_settings",
    "gallery_export",
    "gallery_extras",
    "model_list",
    "model_download",
    "llm_load",
    "llm_add_adapter",
    "llm_send",
    "llm_reset",
    "llm_mixer_train",
    "llm_mixer_load",
    "llm_mixer_off",
    "llm_batch",
    "llm_chameleon_train",
    "embedding_list",
    "embedding_remove",
    "api_status",
    "api_start",
    "api_stop",
];

fn main() {
    // tauri.conf.json lives at the repository root (the design card's layout), not in this crate.
    let attrs = tauri_build::Attributes::new()
        .config_path("../tauri.conf.json")
        .app_manifest(tauri_build::AppManifest::new().commands(COMMANDS));
    tauri_build::try_build(attrs).expect("tauri-build failed");
}
