//! Per-op wall time, for the per-op table in BENCHMARKS.md (`loramix bench --profile`).
//!
//! A sampling profiler cannot say which GEMM belongs to a convolution and which to a linear layer
//! (the model code is built without frame pointers), so the ops that matter mark themselves.
//! Off by default: a disabled span is one relaxed atomic load. Only the outermost span on a thread
//! records, so a convolution inside a LoRA branch counts once, under its caller.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

static ENABLED: AtomicBool = AtomicBool::new(false);
static TOTALS: Mutex<BTreeMap<&'static str, OpTime>> = Mutex::new(BTreeMap::new());

thread_local! {
    static DEPTH: Cell<usize> = const { Cell::new(0) };
}

/// Accumulated time of one op kind.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct OpTime {
    pub seconds: f64,
    pub calls: u64,
}

/// Turns recording on or off; turning it on clears what was recorded.
pub fn enable(on: bool) {
    if on {
        if let Ok(mut t) = TOTALS.lock() {
            t.clear();
        }
    }
    ENABLED.store(on, Ordering::Relaxed);
}

/// What was recorded since `enable(true)`, by op kind.
pub fn totals() -> BTreeMap<&'static str, OpTime> {
    TOTALS.lock().map(|t| t.clone()).unwrap_or_default()
}

/// Times the enclosing scope as `name` (when recording, and when no outer span is open).
#[must_use]
pub struct Span {
    open: Option<(&'static str, Instant)>,
}

pub fn span(name: &'static str) -> Span {
    if !ENABLED.load(Ordering::Relaxed) {
        return Span { open: None };
    }
    let outer = DEPTH.with(|d| {
        let v = d.get();
        d.set(v + 1);
        v
    });
    Span {
        open: (outer == 0)
            .then(|| (name, Instant::now()))
            .or(Some(("", Instant::now()))),
    }
}

impl Drop for Span {
    fn drop(&mut self) {
        let Some((name, start)) = self.open.take() else {
            return;
        };
        DEPTH.with(|d| d.set(d.get().saturating_sub(1)));
        if name.is_empty() {
            return; // nested: the outer span holds this time
        }
        let dt = start.elapsed().as_secs_f64();
        if let Ok(mut t) = TOTALS.lock() {
            let e = t.entry(name).or_default();
            e.seconds += dt;
            e.calls += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_outer_spans_record() {
        enable(true);
        {
            let _a = span("outer-test");
            let _b = span("inner-test");
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let t = totals();
        enable(false);
        assert_eq!(t.get("outer-test").map(|o| o.calls), Some(1));
        assert!(t.get("outer-test").is_some_and(|o| o.seconds >= 0.002));
        assert!(!t.contains_key("inner-test"));
        let _c = span("off-test");
        drop(_c);
        assert!(!totals().contains_key("off-test"));
    }
}
