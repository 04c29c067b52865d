//! `--suite sdxl-memory`: peak resident memory of one full generation from a single-file SDXL
//! checkpoint (issue 19), ours (`generate`, plain and `--low-memory`) beside diffusers' (plain,
//! VAE tiling, and the CPU-offload modes where they apply), each in a fresh process.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

pub struct MemoryRun {
    pub label: String,
    pub peak_mb: Option<f64>,
    pub seconds: f64,
    /// Why the run produced no figure (a failure, or a mode that does not apply here).
    pub error: Option<String>,
}

pub struct Setup<'a> {
    pub checkpoint: &'a Path,
    pub config: &'a Path,
    pub python: Option<&'a Path>,
    pub size: usize,
    pub steps: usize,
    pub dtype: &'a str,
    /// The dtype diffusers runs in: torch's CPU has no fast f16 convolution (an f16 SDXL step at
    /// 1024² did not finish in 14 minutes on 2 cores), so by default diffusers runs in f32.
    pub reference_dtype: &'a str,
}

/// A finished child: exit success, stdout, stderr and its own peak RSS in MB.
struct Finished {
    ok: bool,
    stdout: String,
    stderr: String,
    peak_mb: Option<f64>,
}

/// Runs `cmd` to completion. The peak is the child's own (`wait4`'s rusage on Linux), so runs in
/// one bench do not see each other's peaks as `RUSAGE_CHILDREN` would.
fn run_measured(mut cmd: Command) -> Result<Finished> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("running {cmd:?}"))?;
    let pipe = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut r) = r {
                let _ = r.read_to_string(&mut s);
            }
            s
        })
    };
    let out = pipe(child.stdout.take().map(|r| Box::new(r) as Box<dyn Read + Send>));
    let err = pipe(child.stderr.take().map(|r| Box::new(r) as Box<dyn Read + Send>));
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    let (ok, peak_mb) = {
        let mut status = 0;
        // SAFETY: rusage is plain data, zero is a valid value; wait4 fills it for our own child.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        let pid = child.id() as libc::pid_t;
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if r != pid {
            bail!("waiting for {cmd:?}: {}", std::io::Error::last_os_error());
        }
        (libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, Some(usage.ru_maxrss as f64 / 1024.0))
    };
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let (ok, peak_mb) = (child.wait()?.success(), None);
    Ok(Finished { ok, stdout: out.join().unwrap_or_default(), stderr: err.join().unwrap_or_default(), peak_mb })
}

fn ours(s: &Setup, low_memory: bool, out_dir: &Path) -> Result<MemoryRun> {
    let exe = std::env::current_exe().context("finding this executable")?;
    let mut cmd = Command::new(exe);
    cmd.arg("generate")
        .arg("--model")
        .arg(s.checkpoint)
        .arg("--config")
        .arg(s.config)
        .args(["--dtype", s.dtype, "--prompt", "a photo of a cat", "--seed", "1"])
        .args(["--steps", &s.steps.to_string(), "--width", &s.size.to_string(), "--height", &s.size.to_string()])
        .arg("--out")
        .arg(out_dir);
    if low_memory {
        cmd.arg("--low-memory");
    }
    let t = Instant::now();
    let f = run_measured(cmd)?;
    let error = (!f.ok).then(|| f.stderr.lines().last().unwrap_or("failed").to_string());
    let label = format!("ours ({}), generate{}", s.dtype, if low_memory { " --low-memory" } else { "" });
    Ok(MemoryRun { label, peak_mb: f.peak_mb.filter(|_| f.ok), seconds: t.elapsed().as_secs_f64(), error })
}

fn reference(s: &Setup, python: &Path, repo: &Path, mode: &str) -> Result<MemoryRun> {
    let mut cmd = Command::new(python);
    cmd.arg(repo.join("tools/bench/sdxl_memory.py"))
        .arg(s.checkpoint)
        .arg(s.config)
        .args(["--size", &s.size.to_string(), "--steps", &s.steps.to_string(), "--dtype", s.reference_dtype, "--mode", mode]);
    let t = Instant::now();
    let f = run_measured(cmd)?;
    let label = format!("diffusers ({}), {}", s.reference_dtype, match mode {
        "plain" => "plain",
        "vae_tiling" => "enable_vae_tiling (512-pixel tiles)",
        "model_offload" => "enable_model_cpu_offload",
        "sequential_offload" => "enable_sequential_cpu_offload",
        m => m,
    });
    let json: Option<serde_json::Value> = f.stdout.lines().last().and_then(|l| serde_json::from_str(l).ok());
    let error = match (&json, f.ok) {
        (Some(j), true) => j["error"].as_str().map(str::to_string),
        _ => Some(f.stderr.lines().last().unwrap_or("failed").to_string()),
    };
    Ok(MemoryRun { label, peak_mb: f.peak_mb.filter(|_| error.is_none()), seconds: t.elapsed().as_secs_f64(), error })
}

pub fn run(repo: &Path, s: &Setup) -> Result<Vec<MemoryRun>> {
    if !s.checkpoint.is_file() {
        bail!("--checkpoint {}: no such file (make one with tools/bench/make_full_sdxl.py)", s.checkpoint.display());
    }
    let out_dir: PathBuf = std::env::temp_dir().join(format!("loramix-sdxl-memory-{}", std::process::id()));
    let mut runs = vec![ours(s, false, &out_dir)?, ours(s, true, &out_dir)?];
    let _ = std::fs::remove_dir_all(&out_dir);
    if let Some(py) = s.python {
        for mode in ["plain", "vae_tiling", "model_offload", "sequential_offload"] {
            runs.push(reference(s, py, repo, mode)?);
        }
    }
    Ok(runs)
}

pub fn table(runs: &[MemoryRun], s: &Setup) -> String {
    let size_mb = std::fs::metadata(s.checkpoint).map(|m| m.len() as f64 / (1024.0 * 1024.0)).unwrap_or(0.0);
    let mut t = format!(
        "SDXL generation from {} ({:.0} MiB, {}), {}², {} step(s), CPU: peak resident memory of each run (a fresh process)\n\n",
        s.checkpoint.file_name().and_then(|n| n.to_str()).unwrap_or("?"),
        size_mb,
        s.dtype,
        s.size,
        s.steps
    );
    t += "| run | peak RSS (MiB) | × checkpoint | wall (s) |\n|---|---|---|---|\n";
    for r in runs {
        match (r.peak_mb, &r.error) {
            (Some(p), _) => t += &format!("| {} | {p:.0} | {:.2}× | {:.0} |\n", r.label, p / size_mb.max(1e-9), r.seconds),
            (None, e) => t += &format!("| {} | n/a: {} | | |\n", r.label, e.as_deref().unwrap_or("no figure on this OS")),
        }
    }
    t += "\nGoals: plain ≤ 1.15× the checkpoint; --low-memory under 8 GB (7629 MiB).\n";
    t
}
