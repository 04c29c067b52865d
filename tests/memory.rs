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
