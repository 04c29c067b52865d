//! Choosing a device and dtype from user-facing names.

use candle_core::{DType, Device};

use crate::error::{Error, Result};

/// `cpu`, `cuda` / `cuda:N`, or `metal`; GPU backends exist only in builds with their feature.
pub fn parse_device(name: &str) -> Result<Device> {
    let (kind, ordinal) = match name.split_once(':') {
        Some((k, n)) => (k, n.parse::<usize>().map_err(|_| Error::Argument(format!("device {name:?}: bad ordinal")))?),
        None => (name, 0),
    };
    match kind {
        "cpu" => Ok(Device::Cpu),
        "cuda" if cfg!(feature = "cuda") => Ok(Device::new_cuda(ordinal)?),
        "metal" if cfg!(feature = "metal") => Ok(Device::new_metal(ordinal)?),
        "cuda" | "metal" => Err(Error::Argument(format!(
            "this build has no {kind} support; rebuild with `cargo build --release --features {kind}`"
        ))),
        other => Err(Error::Argument(format!("unknown device {other:?}; expected cpu, cuda or metal"))),
    }
}

pub fn parse_dtype(name: &str) -> Result<DType> {
    match name {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        other => Err(Error::Argument(format!("unknown dtype {other:?}; expected f32, f16 or bf16"))),
    }
}
