//! A1111 prompt syntax on arbitrary text: prompt editing / alternation schedules and the
//! attention parser must give a schedule or a clean error, never a panic, hang or deep recursion.
#![no_main]

use libfuzzer_sys::fuzz_target;
use loramix::sdxl::prompt::parse_attention;
use loramix::sdxl::prompt_schedule::{a1111_schedule, entry_at, prompt_schedule};

fuzz_target!(|data: &[u8]| {
    let Some((&steps, rest)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    let steps = 1 + steps as usize % 60;
    let schedule = a1111_schedule(text, steps);
    assert!(!schedule.is_empty() && schedule.last().map(|e| e.0) == Some(steps));
    for k in 0..steps {
        let (_, t) = &schedule[entry_at(&schedule, k)];
        let _ = parse_attention(t);
    }
    let _ = prompt_schedule(text, steps);
});
