//! Loading weights must not keep the file's pages resident beside the copies (issue 19: peak RSS
//! while loading was twice the weights). Linux only: it reads `RssFile` from /proc.

#[cfg(target_os = "linux")]
#[test]
fn loading_releases_the_mapped_pages() -> loramix::Result<()> {
    use loramix::weights::{f32_le_bytes, safetensors_bytes, SafetensorsFile};
    use safetensors::tensor::Dtype;

    fn rss_file_mb() -> f64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let kb: f64 = status.lines().find(|l| l.starts_with("RssFile:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()).unwrap_or(f64::NAN);
        kb / 1024.0
    }

    // 16 tensors of 4 MiB: 64 MiB of f32.
    let dir = tempfile::tempdir().map_err(|e| loramix::Error::io(std::path::Path::new("tempdir"), e))?;
    let path = dir.path().join("weights.safetensors");
    let values: Vec<f32> = (0..1 << 20).map(|i| (i % 1000) as f32 * 1e-3).collect();
    let tensors: Vec<_> = (0..16).map(|i| (format!("t{i}"), vec![1024usize, 1024], f32_le_bytes(&values))).collect();
    std::fs::write(&path, safetensors_bytes(Dtype::F32, &tensors, None, "test weights")?).map_err(|e| loramix::Error::io(&path, e))?;

    let before = rss_file_mb();
    let file = SafetensorsFile::open(&path)?;
    let loaded: Vec<_> = (0..16).map(|i| file.load(&format!("t{i}"))).collect::<loramix::Result<_>>()?;
    let grown = rss_file_mb() - before;
    assert_eq!(loaded.len(), 16);
    // Without the release every page read stays mapped: +64 MiB of file-backed RSS.
    assert!(grown < 8.0, "file-backed RSS grew by {grown:.1} MB while loading 64 MB");
    // The bytes are still readable after their pages were dropped.
    let again = file.load("t3")?.flatten_all().and_then(|t| t.get(999)).and_then(|v| v.to_scalar::<f32>()).map_err(|e| loramix::Error::Argument(e.to_string()))?;
    assert!((again - 0.999).abs() < 1e-6);
    Ok(())
}

/// A fused tensor served in row slices (OpenCLIP's q/k/v `in_proj`) must give each slice its own
/// compact storage: a view, or candle's `copy` (which clones the whole storage), kept the fused
/// tensor alive once per slice (+700 MB for SDXL's second text encoder in f16).
#[test]
fn row_slices_of_a_fused_tensor_are_compact() -> loramix::Result<()> {
    use candle_core::{DType, Device, Storage};
    use candle_nn::var_builder::SimpleBackend;
    use loramix::weights::{f32_le_bytes, safetensors_bytes, SafetensorsFile, Source, Transform, WeightSource};
    use safetensors::tensor::Dtype;
    use std::collections::HashMap;
    use std::sync::Arc;

    let dir = tempfile::tempdir().map_err(|e| loramix::Error::io(std::path::Path::new("tempdir"), e))?;
    let path = dir.path().join("fused.safetensors");
    let values: Vec<f32> = (0..3 * 8 * 4).map(|i| i as f32).collect();
    std::fs::write(&path, safetensors_bytes(Dtype::F32, &[("in_proj_weight".into(), vec![24, 4], f32_le_bytes(&values))], None, "test")?)
        .map_err(|e| loramix::Error::io(&path, e))?;
    let files = Arc::new(vec![SafetensorsFile::open(&path)?]);
    let index: HashMap<String, Source> = ["q", "k", "v"]
        .iter()
        .enumerate()
        .map(|(i, n)| (format!("{n}.weight"), Source { file: 0, key: "in_proj_weight".into(), transform: Transform::Rows { start: 8 * i, len: 8 } }))
        .collect();
    let ws = WeightSource::remapped(files, index, "fused".into());
    for (i, n) in ["q", "k", "v"].iter().enumerate() {
        let t = ws.get_unchecked(&format!("{n}.weight"), DType::F32, &Device::Cpu).map_err(|e| loramix::Error::Argument(e.to_string()))?;
        let (storage, layout) = t.storage_and_layout();
        let Storage::Cpu(cpu) = &*storage else { panic!("expected CPU storage") };
        let held = cpu.as_slice::<f32>().map_err(|e| loramix::Error::Argument(e.to_string()))?.len();
        assert_eq!(held, 32, "{n}: the slice holds {held} values of storage, expected its own 32");
        assert_eq!(layout.start_offset(), 0);
        let first = t.flatten_all().and_then(|t| t.get(0)).and_then(|v| v.to_scalar::<f32>()).map_err(|e| loramix::Error::Argument(e.to_string()))?;
        assert_eq!(first, (32 * i) as f32);
    }
    Ok(())
}
