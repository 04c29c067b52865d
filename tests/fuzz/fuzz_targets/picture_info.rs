//! Reading generation parameters out of pictures (PNG chunks, JPEG segments, EXIF, NovelAI
//! comments) on arbitrary bytes, as a dropped or uploaded picture can be: Ok or a clean error,
//! never a panic, hang or huge allocation. The input is also tried behind each signature so the
//! PNG and JPEG walkers see it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use loramix::studio::{read_image_info, user_comment_text};

fuzz_target!(|data: &[u8]| {
    let _ = read_image_info(data);
    for signature in [&b"\x89PNG\r\n\x1a\n"[..], b"\xff\xd8\xff", b"RIFF\0\0\0\0WEBPVP8X"] {
        let _ = read_image_info(&[signature, data].concat());
    }
    let _ = user_comment_text(data);
});
