//! The LoRAMix desktop shell: window, state and command registration. Everything the app does
//! is in the `loramix` engine; [`commands`] is the thin layer between the two.

pub mod commands;

use std::path::PathBuf;

use tauri::{Emitter, Manager};

/// Where the shipped models (miniworld) are: beside the executable's resources when bundled,
/// else the repository's `models/` (development), found from the working directory up.
fn models_dir(app: &tauri::AppHandle) -> PathBuf {
    if let Ok(dir) = std::env::var("LORAMIX_MODELS") {
        return PathBuf::from(dir);
    }
    if let Ok(res) = app.path().resource_dir() {
        if res.join("models/miniworld/model_index.json").exists() {
            return res.join("models");
        }
    }
    let mut dir = std::env::current_dir().unwrap_or_default();
    loop {
        if dir.join("models/miniworld/model_index.json").exists() {
            return dir.join("models");
        }
        if !dir.pop() {
            return PathBuf::from("models");
        }
    }
}

pub fn run() {
    loramix::weights::tune_allocator();
    tauri::Builder::default()
        .setup(|app| {
            let library = loramix::lora::library::LoraLibrary::default_root()?;
            let state = commands::AppState::new(library, models_dir(app.handle()))?;
            app.manage(state);
            // The local API, if it was switched on when the app last ran.
            let handle = app.handle().clone();
            tauri::async_runtime::spawn(async move {
                let state = handle.state::<commands::AppState>();
                match state.api_settings() {
                    Ok(s) if s.enabled => {
                        if let Err(e) = state.api_start(s).await {
                            eprintln!("local API not started: {e}");
                        }
                    }
                    Ok(_) => {}
                    Err(e) => eprintln!("local API settings: {e}"),
                }
            });
            Ok(())
        })
        .on_window_event(|window, event| {
            // OS drag and drop: the UI decides what a drop means (LoRAs → import, PNG → restore).
            if let tauri::WindowEvent::DragDrop(tauri::DragDropEvent::Drop { paths, .. }) = event {
                let _ = window.emit("loramix://drop", paths);
            }
        })
        .invoke_handler(tauri::generate_handler![
            commands::app_info,
            commands::library_list,
            commands::library_import,
            commands::library_update,
            commands::library_remove,
            commands::embedding_list,
            commands::api_status,
            commands::api_start,
            commands::api_stop,
            commands::embedding_remove,
            commands::library_train,
            commands::library_train_stop,
            commands::subspace_list,
            commands::subspace_replace,
            commands::subspace_restore,
            commands::studio_generate,
            commands::studio_grid,
            commands::studio_cancel,
            commands::gallery_list,
            commands::gallery_image,
            commands::studio_image,
            commands::studio_save_mask,
            commands::gallery_settings,
            commands::gallery_export,
            commands::gallery_extras,
            commands::model_list,
            commands::model_download,
            commands::llm_load,
            commands::llm_add_adapter,
            commands::llm_send,
            commands::llm_reset,
            commands::llm_mixer_train,
            commands::llm_mixer_load,
            commands::llm_mixer_off,
            commands::llm_batch,
            commands::llm_chameleon_train,
        ])
        .run(tauri::generate_context!("../tauri.conf.json"))
        .expect("error while running the LoRAMix app");
}
