//! Runtime dispatch of our elementwise loops to the widest x86 vector level the CPU has.
//!
//! The crates build for baseline x86-64 (SSE2, no FMA) so that one binary runs everywhere; our
//! loops were then vectorised 4 wide while torch's run 16 wide on AVX-512 (and gemm already picks
//! AVX-512 at run time). `multiversion!` compiles a function's body three times — AVX-512,
//! AVX2+FMA, baseline — and picks one per call from the (cached) CPU feature check. Rust does not
//! contract `a * b + c` into FMA on its own, so every version computes the same bits; only the
//! vector width differs. Why ours: the `multiversion` crate does the same with a proc macro we
//! would have to add for three small loops.

/// `multiversion! { fn name(arg: Type, ...) { body } }` (no return value, no generics).
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn generic($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512dq,avx2,fma")]
                unsafe fn v4($($arg: $ty),*) {
                    generic($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) {
                    generic($($arg),*)
                }
                if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512vl") && std::is_x86_feature_detected!("avx512dq") {
                    // SAFETY: the CPU has every feature v4 was compiled for.
                    return unsafe { v4($($arg),*) };
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: as above, for v3.
                    return unsafe { v3($($arg),*) };
                }
            }
            generic($($arg),*)
        }
    };
}

pub(crate) use multiversion;
