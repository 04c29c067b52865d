//! The Hugging Face hub as both model kinds (SDXL and LLM) reach it: the standard HF cache, the
//! offline switch and the token, and an API client when online. Which files to fetch is each
//! model kind's business (`sdxl::model`, `llm`).

/// A repo on the HF hub as seen from here: its cache, whether we may go online, an API client
/// (none offline or unreachable) and the repo's file listing (none when it could not be read).
pub struct HubRepo {
    pub cache: hf_hub::Cache,
    pub cached: hf_hub::CacheRepo,
    pub offline: bool,
    pub api: Option<hf_hub::api::sync::Api>,
    pub listing: Option<Vec<String>>,
}

impl HubRepo {
    /// `HF_HUB_OFFLINE=1` keeps us offline; the token comes from `HF_TOKEN` or the HF token file.
    pub fn open(repo: &str) -> Self {
        use hf_hub::api::sync::ApiBuilder;
        let cache = hf_hub::Cache::from_env();
        let cached = cache.model(repo.to_string());
        let offline = std::env::var("HF_HUB_OFFLINE").map(|v| v == "1" || v.eq_ignore_ascii_case("true")).unwrap_or(false);
        let token = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()).or_else(|| cache.token());
        let api = if offline { None } else { ApiBuilder::from_cache(cache.clone()).with_token(token).with_progress(true).build().ok() };
        let listing = api
            .as_ref()
            .and_then(|a| a.model(repo.to_string()).info().ok())
            .map(|i| i.siblings.into_iter().map(|s| s.rfilename).collect());
        Self { cache, cached, offline, api, listing }
    }
}

/// Whether `spec` reads as a hub repo id (`owner/name`) rather than a path.
pub fn is_repo_id(spec: &str) -> bool {
    let parts: Vec<&str> = spec.split('/').collect();
    let valid = |s: &str| !s.is_empty() && !s.starts_with('.') && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    parts.len() == 2 && parts.iter().all(|s| valid(s))
}

/// The models we ship (`models/miniworld`, `models/minichat`, ...) found from any working
/// directory: a relative `models/...` path that is not there is looked up in the source tree
/// the binary was built from, which is where `cargo run` and `target/*/loramix` find them. A
/// bare name (`miniworld`, as A1111's `Model:` names a model in the pictures it restores from)
/// is a shipped model folder of that name.
pub fn shipped(spec: &str) -> Option<std::path::PathBuf> {
    let p = std::path::Path::new(spec);
    let is_model = |p: &std::path::Path| p.is_file() || ["model_index.json", "config.json"].iter().any(|f| p.join(f).is_file());
    let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    if spec.starts_with("models/") {
        let there = source.join(p);
        return (!p.exists() && there.exists()).then_some(there);
    }
    // A folder of that name here that is no model (an output folder named after the model)
    // does not hide ours.
    if p.exists() && is_model(p) {
        return None;
    }
    let bare = !spec.is_empty() && !spec.starts_with('.') && spec.chars().all(|c| c.is_ascii_alphanumeric() || "-_".contains(c));
    let there = source.join("models").join(spec);
    (bare && ["model_index.json", "config.json"].iter().any(|f| there.join(f).is_file())).then_some(there)
}

#[cfg(test)]
mod shipped_tests {
    use super::shipped;

    /// A bare name is a shipped model folder only; other names and paths are left alone.
    #[test]
    fn bare_names_find_shipped_models() {
        let miniworld = shipped("miniworld").expect("models/miniworld is shipped");
        assert!(miniworld.ends_with("models/miniworld") && miniworld.join("model_index.json").is_file());
        for other in ["sd_xl_base_1.0", "../miniworld", "models", "", "miniworld/vae"] {
            assert_eq!(shipped(other), None, "{other}");
        }
    }
}
