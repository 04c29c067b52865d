//! Reading generation parameters out of pictures (PNG chunks, JPEG segments, EXIF, NovelAI
//! comments) on arbitrary bytes, as a dropped or uploaded picture can be: Ok or a clean error,
//! never a panic, hang or huge allocation. The input is also tried behind each signature so the
//! PNG and JPEG walkers see it. The bytes as text are also parsed as A1111 parses an infotext,
//! with a style database made from them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use loramix::studio::{parse_generation_parameters, read_image_info, user_comment_text, PasteContext, PromptStyle};

fuzz_target!(|data: &[u8]| {
    let _ = read_image_info(data);
    for signature in [&b"\x89PNG\r\n\x1a\n"[..], b"\xff\xd8\xff", b"RIFF\0\0\0\0WEBPVP8X"] {
        let _ = read_image_info(&[signature, data].concat());
    }
    let _ = user_comment_text(data);
    let text = String::from_utf8_lossy(data);
    let (prompt, negative) = text.split_once('|').unwrap_or((&text, ""));
    let style = PromptStyle { name: "s".into(), prompt: prompt.chars().take(16).collect(), negative_prompt: negative.chars().take(16).collect() };
    let _ = parse_generation_parameters(&text, &PasteContext::new(&[style], [("0123456789ab".to_string(), "x".to_string())]));
});
