//! `loramix serve`: the A1111-compatible HTTP API on loopback (see `loramix::api`).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use loramix::api::{self, ApiConfig, Worker};
use loramix::device::{parse_device, parse_dtype};
use loramix::studio::Studio;
use loramix::LoadOptions;

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Address to bind; anything but loopback exposes the API to the network (use --api-auth).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 7860)]
    port: u16,
    /// Require HTTP Basic credentials: USER:PASS.
    #[arg(long, value_name = "USER:PASS")]
    api_auth: Option<String>,
    /// The checkpoint until a client sets sd_model_checkpoint.
    #[arg(long, default_value = "models/miniworld", value_parser = crate::model_arg)]
    model: String,
    /// More checkpoints for sd-models (diffusers folders and .safetensors files in it).
    #[arg(long)]
    models_dir: Option<PathBuf>,
    /// Library for <lora:NAME:w> tags, wildcards and styles.csv.
    #[arg(long)]
    library: Option<PathBuf>,
    /// Where requests with save_images write.
    #[arg(long, default_value = "outputs/api")]
    out: PathBuf,
    /// Requests that may wait; more are answered 503.
    #[arg(long, default_value_t = 256)]
    queue_limit: usize,
    /// Largest request body, MiB.
    #[arg(long, default_value_t = 64)]
    body_limit_mib: usize,
    #[arg(long, default_value = "f32")]
    dtype: String,
    #[arg(long, default_value = "cpu")]
    device: String,
}

pub fn run(a: ServeArgs) -> Result<()> {
    let auth = match a.api_auth.as_deref() {
        None => None,
        Some(s) => {
            let (u, p) = s.split_once(':').filter(|(u, p)| !u.is_empty() && !p.is_empty()).context("--api-auth: expected USER:PASS")?;
            Some((u.to_string(), p.to_string()))
        }
    };
    let config = ApiConfig {
        host: a.host.clone(),
        port: a.port,
        auth,
        library: a.library.clone(),
        model: a.model.clone(),
        models_dir: a.models_dir.clone(),
        out: a.out.clone(),
        queue_limit: a.queue_limit.max(1),
        body_limit: a.body_limit_mib.max(1) << 20,
    };
    let load = LoadOptions { device: parse_device(&a.device)?, dtype: parse_dtype(&a.dtype)?, ..LoadOptions::default() };
    let worker = Arc::new(Worker::start(Arc::new(Studio::with_load_options(load)), a.library.clone(), a.out.clone()));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    eprintln!("A1111-compatible API on http://{}:{}/sdapi/v1/ (model {})", a.host, a.port, a.model);
    rt.block_on(api::serve(config, worker, async {
        let _ = tokio::signal::ctrl_c().await;
    }))?;
    Ok(())
}
