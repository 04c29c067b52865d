//! Scans raw little-endian weight bytes for NaN and ±Inf.
//!
//! A checkpoint with a non-finite weight produces black or noise images many minutes later;
//! checking at load time turns that into an error naming the tensor. The scan works on the
//! mapped file bytes so no converted copy is made.

use half::{bf16, f16};

/// Element types the scan understands (the ones safetensors checkpoints use for weights).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawDType {
    F16,
    BF16,
    F32,
    F64,
}

/// Number of non-finite elements in `bytes`, read as `dtype` (little-endian).
pub fn count_non_finite(bytes: &[u8], dtype: RawDType) -> usize {
    match dtype {
        // For the half types an exponent of all ones means Inf or NaN; test the bits directly.
        RawDType::F16 => bytes
            .chunks_exact(2)
            .filter(|c| !f16::from_bits(u16::from_le_bytes([c[0], c[1]])).is_finite())
            .count(),
        RawDType::BF16 => bytes
            .chunks_exact(2)
            .filter(|c| !bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).is_finite())
            .count(),
        RawDType::F32 => bytes
            .chunks_exact(4)
            .filter(|c| !f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite())
            .count(),
        RawDType::F64 => bytes
            .chunks_exact(8)
            .filter(|c| !f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]).is_finite())
            .count(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_nan_and_inf() {
        let v: Vec<u8> = [1.0f32, f32::NAN, 2.0, f32::NEG_INFINITY].iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(count_non_finite(&v, RawDType::F32), 2);
        let h: Vec<u8> = [f16::from_f32(1.0), f16::INFINITY].iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(count_non_finite(&h, RawDType::F16), 1);
        let b: Vec<u8> = [bf16::from_f32(1.0), bf16::NAN, bf16::NAN].iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(count_non_finite(&b, RawDType::BF16), 2);
    }
}
