//! With the `cuda` feature, compiles `cuda/*.cu` to PTX with nvcc (the kernels are loaded at run
//! time through candle's CUDA device). Without it, does nothing: the default build needs no CUDA.

use std::path::PathBuf;
use std::process::Command;

const KERNELS: [&str; 3] = ["attention", "lora", "elementwise"];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=cuda/dtype.cuh");
    for k in KERNELS {
        println!("cargo:rerun-if-changed=cuda/{k}.cu");
    }
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    for k in KERNELS {
        let ptx = out.join(format!("{k}.ptx"));
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17", &format!("-arch=sm_{cap}"), "-o"])
            .arg(&ptx)
            .arg(format!("cuda/{k}.cu"))
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => panic!("nvcc failed on kernels/cuda/{k}.cu ({s})"),
            Err(e) => panic!(
                "the `cuda` feature needs nvcc ({nvcc}: {e}); install CUDA 13.0 or run `eval \"$(bash tools/cuda/toolchain.sh)\"` first"
            ),
        }
    }
}
