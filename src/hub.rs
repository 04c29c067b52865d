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
