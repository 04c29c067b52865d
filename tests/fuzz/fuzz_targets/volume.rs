//! The volume inputs on arbitrary text: wildcards and dynamic prompts (`{2$$a|b}`, `__x__`),
//! batch manifest lines, grid axis specs and the API's JSON bodies must give a value or a clean
//! error, never a panic, hang or unbounded growth.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use loramix::api::a1111::{to_settings, GenerationRequest};
use loramix::studio::{expand_prompt, parse_line, Axis, Manifest};

fuzz_target!(|data: &[u8]| {
    let Some((&seed, rest)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    let mut wildcards: HashMap<String, Vec<String>> = HashMap::new();
    // A wildcard whose line is the input itself: recursion must be bounded.
    wildcards.insert("self".into(), vec![text.to_string()]);
    wildcards.insert("color".into(), vec!["red".into(), "{a|b}".into()]);
    if let Ok(out) = expand_prompt(text, &wildcards, seed as u64) {
        assert!(out.len() <= (1 << 20) + 4 * text.len() + 64);
    }
    let _ = parse_line(text);
    let _ = Manifest::parse(text);
    let _ = text.parse::<Axis>();
    if let Ok(req) = serde_json::from_str::<GenerationRequest>(text) {
        let _ = to_settings(&req, "m", None, None);
    }
});
