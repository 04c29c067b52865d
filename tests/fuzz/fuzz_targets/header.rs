//! Safetensors header validation, LoRA key parsing and header-only inspection on arbitrary
//! bytes: any input must give Ok or a clean error, never a panic, hang or huge allocation.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use loramix::lora::keys::parse_key;
use loramix::weights::SafetensorsFile;

fuzz_target!(|data: &[u8]| {
    if let Ok(file) = SafetensorsFile::from_bytes(Path::new("fuzz.safetensors"), data.to_vec()) {
        for name in file.names() {
            let _ = parse_key(&name);
        }
        let _ = loramix::lora::inspect(&file);
        let _ = file.check_finite();
    }
    if let Ok(text) = std::str::from_utf8(data) {
        for line in text.lines() {
            let _ = parse_key(line);
        }
        let _ = loramix::lora::extract_prompt_loras(text);
        let _ = loramix::lora::parse_lora_arg(text);
    }
});
