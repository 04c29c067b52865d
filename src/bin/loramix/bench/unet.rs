//! `loramix bench`: seconds per SDXL UNet step on the CPU, ours beside diffusers on the same
//! weights, inputs and thread count, measured in one run and reported as a ratio.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::io::{BufRead, BufReader, Lines, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use loramix_models::sdxl::{AddedConditions, UNet2DConditionConfig, UNet2DConditionModel};

use loramix::error::{Error, Result};
use loramix::sdxl::model;

/// One benchmarked UNet.
pub struct BenchCase {
    pub name: &'static str,
    pub unet_dir: PathBuf,
    /// Latent height, width.
    pub latent: (usize, usize),
    /// Passed to the Python side to create the weights when absent.
    pub create: Option<&'static str>,
}

pub fn default_cases(repo: &Path) -> Vec<BenchCase> {
    vec![
        BenchCase {
            name: "tiny2 (fixture, 32x32 px)",
            unet_dir: repo.join("tests/fixtures/sdxl/tiny2/pipeline/unet"),
            latent: (4, 4),
            create: None,
        },
        BenchCase {
            name: "tiny3 (fixture, 48x40 px)",
            unet_dir: repo.join("tests/fixtures/sdxl/tiny3/pipeline/unet"),
            latent: (12, 10),
            create: None,
        },
        BenchCase {
            name: "mid (160/320/640, 512x512 px)",
            unet_dir: repo.join("target/bench/mid/unet"),
            latent: (64, 64),
            create: Some("mid"),
        },
        BenchCase {
            name: "mid2 (128/256/512, depths 1/1/2, 1 layer per block, 512x512 px)",
            unet_dir: repo.join("target/bench/mid2/unet"),
            latent: (64, 64),
            create: Some("mid2"),
        },
        BenchCase {
            name: "conv (128/256/512, attention at 16x16 only, 512x512 px)",
            unet_dir: repo.join("target/bench/conv/unet"),
            latent: (64, 64),
            create: Some("conv"),
        },
    ]
}

pub struct BenchRow {
    pub name: String,
    pub params: usize,
    pub ours: f64,
    pub reference: Option<f64>,
    /// With a reference and more than one measurement of it: each measurement's ratio (diffusers
    /// / ours), in order: one per round, or one per step pair with `--alternate`.
    pub ratios: Vec<f64>,
    /// What `ratios` are taken over, for the table's header: "rounds" or "step pairs".
    pub ratios_over: &'static str,
    /// With `--profile`: ms per step by op kind, ours and the reference's (torch.profiler).
    pub ops: Option<OpProfile>,
    /// With `--memory`: peak resident set (MB) of a process that loads the UNet and steps it,
    /// ours (a fresh child process, one step) and the reference's (its own process).
    pub peak_rss: Option<(Option<f64>, Option<f64>)>,
}

/// This process's peak resident set in MB (Linux `VmHWM`; `None` elsewhere).
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// The child side of `--memory`: load config `name`, run one step, print the peak RSS as JSON.
pub fn rss_child(repo: &Path, name: &str) -> Result<()> {
    let case = default_cases(repo)
        .into_iter()
        .find(|c| c.name.split_whitespace().next() == Some(name))
        .ok_or_else(|| Error::Argument(format!("--config {name}: no such UNet config")))?;
    ours(&case, 1, false)?;
    println!("{}", serde_json::json!({ "peak_rss_mb": peak_rss_mb() }));
    Ok(())
}

/// Runs `rss_child` in a fresh process of this binary, so earlier configs do not raise the peak.
fn ours_peak_rss(case: &BenchCase) -> Result<Option<f64>> {
    let exe = std::env::current_exe().map_err(|e| Error::Argument(format!("finding this executable: {e}")))?;
    let name = case.name.split_whitespace().next().unwrap_or("");
    let out = Command::new(exe)
        .args(["bench", "--suite", "unet-rss", "--config", name])
        .output()
        .map_err(|e| Error::Argument(format!("running the memory child: {e}")))?;
    if !out.status.success() {
        return Err(Error::Argument(format!("memory child for {name} failed: {}", String::from_utf8_lossy(&out.stderr))));
    }
    let line = String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or("").to_string();
    let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| Error::Argument(format!("memory child output {line:?}: {e}")))?;
    Ok(v["peak_rss_mb"].as_f64())
}

pub struct OpProfile {
    pub ours: BTreeMap<String, f64>,
    pub reference: BTreeMap<String, f64>,
}

/// The kinds `kernels/src/profile.rs` records, in table order; the rest of a step is "other".
const OP_KINDS: [&str; 8] = [
    "conv 3x3",
    "conv 1x1",
    "conv (other)",
    "linear",
    "attention",
    "group norm (+SiLU)",
    "layer norm",
    "GEGLU",
];

/// The middle value (the mean of the two middle ones for an even count).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 0 { (v[n / 2 - 1] + v[n / 2]) / 2.0 } else { v[n / 2] }
}

/// `tools/bench/unet_step.py` for `case`: its UNet folder, latent size and threads, and the shape
/// to create the weights from when the folder is new.
fn unet_step_command(python: &Path, repo: &Path, case: &BenchCase, threads: usize) -> Command {
    let mut cmd = Command::new(python);
    cmd.arg(repo.join("tools/bench/unet_step.py"))
        .arg("--unet")
        .arg(&case.unet_dir)
        .args(["--height", &case.latent.0.to_string(), "--width", &case.latent.1.to_string()])
        .args(["--threads", &threads.to_string()]);
    if let Some(c) = case.create {
        cmd.args(["--create", c]);
    }
    cmd
}

/// Runs the diffusers side (creating shared weights if needed); returns seconds per step.
fn reference(
    python: &Path,
    repo: &Path,
    case: &BenchCase,
    iters: usize,
    threads: usize,
    profile: bool,
) -> Result<(f64, usize, BTreeMap<String, f64>, Option<f64>)> {
    let mut cmd = unet_step_command(python, repo, case, threads);
    cmd.args(["--iters", &iters.to_string()]);
    if profile {
        cmd.arg("--profile");
    }
    let out = cmd
        .output()
        .map_err(|e| Error::Argument(format!("running {}: {e}", python.display())))?;
    if !out.status.success() {
        return Err(Error::Argument(format!(
            "diffusers benchmark failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    let line = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or("")
        .to_string();
    let v: serde_json::Value = serde_json::from_str(&line)
        .map_err(|e| Error::Argument(format!("diffusers benchmark output {line:?}: {e}")))?;
    let ops = v["ms_per_step_by_op"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_f64().unwrap_or(f64::NAN)))
                .collect()
        })
        .unwrap_or_default();
    Ok((
        v["seconds_per_step"].as_f64().unwrap_or(f64::NAN),
        v["params"].as_u64().unwrap_or(0) as usize,
        ops,
        v["peak_rss_mb"].as_f64(),
    ))
}

/// Our UNet with the bench's inputs (random latents and prompt, SDXL's added conditions), ready
/// to time steps.
struct OurSide {
    unet: UNet2DConditionModel,
    x: Tensor,
    ctx: Tensor,
    added: Option<AddedConditions>,
    params: usize,
}

impl OurSide {
    fn load(case: &BenchCase) -> Result<Self> {
        let root = case.unet_dir.parent().unwrap_or(Path::new("."));
        let (config_path, ws) = model::open_component(
            root,
            case.unet_dir
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("unet"),
        )?;
        let cfg: UNet2DConditionConfig = model::parse_config(&config_path)?;
        let dev = Device::Cpu;
        let unet = UNet2DConditionModel::new(ws.into_var_builder(DType::F32, &dev), &cfg)
            .map_err(|e| Error::model(&case.unet_dir, e.to_string()))?;
        let params: usize = loramix_models::Adaptable::adaptable_layers(&unet)
            .iter()
            .map(|l| l.base_weight.elem_count())
            .sum();
        let (h, w) = case.latent;
        let x = Tensor::randn(0f32, 1.0, (2, cfg.in_channels, h, w), &dev)?;
        let ctx = Tensor::randn(0f32, 1.0, (2, 77, cfg.cross_attention_dim), &dev)?;
        let proj = cfg
            .projection_class_embeddings_input_dim
            .unwrap_or(0)
            .saturating_sub(6 * cfg.addition_time_embed_dim.unwrap_or(0));
        let added = AddedConditions {
            text_embeds: Tensor::randn(0f32, 1.0, (2, proj), &dev)?,
            time_ids: Tensor::from_slice(
                &[
                    8.0f32 * h as f32,
                    8.0 * w as f32,
                    0.0,
                    0.0,
                    8.0 * h as f32,
                    8.0 * w as f32,
                ],
                (1, 6),
                &dev,
            )?
            .repeat((2, 1))?,
        };
        let added = cfg.addition_embed_type.as_ref().map(|_| added);
        Ok(Self { unet, x, ctx, added, params })
    }

    /// One UNet forward; its seconds.
    fn step(&self) -> Result<f64> {
        let t = Instant::now();
        self.unet.forward(&self.x, 500.0, &self.ctx, self.added.as_ref())?;
        Ok(t.elapsed().as_secs_f64())
    }
}

fn ours(
    case: &BenchCase,
    iters: usize,
    profile: bool,
) -> Result<(f64, usize, BTreeMap<String, f64>)> {
    let side = OurSide::load(case)?;
    side.step()?; // warm-up
    let times = (0..iters).map(|_| side.step()).collect::<Result<Vec<_>>>()?;
    let mut ops = BTreeMap::new();
    if profile {
        // Separate iterations, so that the spans' own cost stays out of the timed ones.
        loramix_kernels::profile::enable(true);
        let t = Instant::now();
        for _ in 0..iters {
            side.step()?;
        }
        let total = t.elapsed().as_secs_f64() * 1e3 / iters as f64;
        loramix_kernels::profile::enable(false);
        for (k, v) in loramix_kernels::profile::totals() {
            ops.insert(k.to_string(), v.seconds * 1e3 / iters as f64);
        }
        let known: f64 = ops.values().sum();
        ops.insert("other".into(), (total - known).max(0.0));
    }
    Ok((median(times), side.params, ops))
}

/// diffusers in a `unet_step.py --serve` process: the UNet stays loaded, and each request times
/// one step, so that `--alternate` can interleave its steps with ours.
struct ReferenceServer {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Lines<BufReader<ChildStdout>>,
    params: usize,
}

impl ReferenceServer {
    fn start(python: &Path, repo: &Path, case: &BenchCase, threads: usize) -> Result<Self> {
        let mut child = unet_step_command(python, repo, case, threads)
            .arg("--serve")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| Error::Argument(format!("running {}: {e}", python.display())))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(Error::Argument("diffusers server: no pipes".into()));
        };
        let mut server = Self { child, stdin: Some(stdin), lines: BufReader::new(stdout).lines(), params: 0 };
        let ready = server.answer("ready")?;
        server.params = ready["params"].as_u64().unwrap_or(0) as usize;
        Ok(server)
    }

    /// The next JSON line, which must carry `key`.
    fn answer(&mut self, key: &str) -> Result<serde_json::Value> {
        let line = match self.lines.next() {
            Some(Ok(line)) => line,
            Some(Err(e)) => return Err(Error::Argument(format!("reading the diffusers server: {e}"))),
            None => {
                let status = self.child.wait().map(|s| s.to_string()).unwrap_or_default();
                return Err(Error::Argument(format!(
                    "the diffusers server (tools/bench/unet_step.py --serve) ended before answering {key:?} ({status}; its error is above)"
                )));
            }
        };
        let v: serde_json::Value = serde_json::from_str(&line)
            .map_err(|e| Error::Argument(format!("diffusers server output {line:?}: {e}")))?;
        if v.get(key).is_none() {
            return Err(Error::Argument(format!("diffusers server output {line:?}: expected the key {key:?}")));
        }
        Ok(v)
    }

    /// One diffusers step; its seconds.
    fn step(&mut self) -> Result<f64> {
        let stdin = self.stdin.as_mut().ok_or_else(|| Error::Argument("diffusers server already finished".into()))?;
        writeln!(stdin, "step")
            .and_then(|_| stdin.flush())
            .map_err(|e| Error::Argument(format!("writing to the diffusers server: {e}")))?;
        Ok(self.answer("seconds")?["seconds"].as_f64().unwrap_or(f64::NAN))
    }

    /// Ends the server; its peak resident memory in MB.
    fn finish(mut self) -> Result<Option<f64>> {
        drop(self.stdin.take());
        let rss = self.answer("peak_rss_mb")?["peak_rss_mb"].as_f64();
        let _ = self.child.wait();
        Ok(rss)
    }
}

impl Drop for ReferenceServer {
    fn drop(&mut self) {
        // After an error mid-way: do not leave a process holding a UNet's memory.
        if self.stdin.is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `--alternate`: both UNets loaded at once, and `pairs` step pairs timed in alternation, the
/// side that goes first swapping from pair to pair (ABBA). Why: on a shared VM a side's speed
/// drifts by 10–40 % within a minute, more than the difference being measured; two steps taken
/// seconds apart see the same conditions, so the pair's ratio is what stays comparable.
/// Returns (ours, diffusers' seconds per step, diffusers' parameter count, its peak RSS).
fn alternate(
    python: &Path,
    repo: &Path,
    case: &BenchCase,
    pairs: usize,
    threads: usize,
) -> Result<(Vec<f64>, Vec<f64>, usize, Option<f64>)> {
    // The server first: it writes the weights when the config's folder is new.
    let mut server = ReferenceServer::start(python, repo, case, threads)?;
    let side = OurSide::load(case)?;
    side.step()?; // warm-up
    let (mut ours, mut theirs) = (Vec::with_capacity(pairs), Vec::with_capacity(pairs));
    for pair in 0..pairs {
        if pair % 4 == 0 || pair % 4 == 3 {
            theirs.push(server.step()?);
            ours.push(side.step()?);
        } else {
            ours.push(side.step()?);
            theirs.push(server.step()?);
        }
    }
    let params = server.params;
    let rss = server.finish()?;
    Ok((ours, theirs, params, rss))
}

/// What `run` measures, from the command line.
pub struct RunOptions<'a> {
    /// A Python with diffusers: the reference side. Without it, ours alone.
    pub python: Option<&'a Path>,
    /// Timed steps per measurement (with `alternate`: step pairs).
    pub iters: usize,
    /// How many times each config's pair of measurements is repeated (see `run`).
    pub rounds: usize,
    /// Time the two sides step by step in alternation (see `alternate`).
    pub alternate: bool,
    pub threads: usize,
    /// Config names (the first word of a row, e.g. `mid2`) to run; empty runs all.
    pub only: &'a [String],
    pub profile: bool,
    pub memory: bool,
}

/// Runs every case; with a Python, the diffusers side runs first so both use the same weights.
///
/// `rounds`: how many times each config's pair of measurements (diffusers, then ours) is repeated
/// back to back. Why: on a shared VM a side's speed drifts by 10–20 % within minutes, and a
/// single pair can catch one side in a slow spell (seen: ours 3.06 and 4.17 s/step for the same
/// binary and config twenty minutes apart). Each side's figure is then the median over rounds,
/// the ratio is the median of the rounds' ratios (each taken from two measurements a minute
/// apart), and the table shows the rounds' range so that a spread is seen, not averaged away.
/// The per-op profile and the memory figures come from the first round only.
///
/// `alternate` goes further: one process per side for the whole config, their steps interleaved,
/// each side's figure the median of its steps and the ratio the median of the step pairs' ratios.
pub fn run(repo: &Path, o: &RunOptions) -> Result<Vec<BenchRow>> {
    if o.alternate {
        if o.python.is_none() {
            return Err(Error::Argument("--alternate needs --python (it interleaves diffusers' steps with ours)".into()));
        }
        if o.profile || o.rounds > 1 {
            return Err(Error::Argument(
                "--alternate times step pairs in one session: run --profile and --rounds without it".into(),
            ));
        }
    }
    let mut rows = Vec::new();
    for case in default_cases(repo) {
        if !o.only.is_empty()
            && !o
                .only
                .iter()
                .any(|n| case.name.split_whitespace().next() == Some(n.as_str()))
        {
            continue;
        }
        if o.python.is_none() && !case.unet_dir.is_dir() {
            continue;
        }
        let (mut ours_times, mut ref_times, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        let (mut params, mut ref_params, mut our_ops, mut ref_ops, mut ref_rss) = (0, 0, BTreeMap::new(), BTreeMap::new(), None);
        let ratios_over = if o.alternate { "step pairs" } else { "rounds" };
        match o.python {
            Some(py) if o.alternate => {
                let (ours, theirs, p, rss) = alternate(py, repo, &case, o.iters, o.threads)?;
                ratios = theirs.iter().zip(&ours).map(|(t, o)| t / o).collect();
                (ours_times, ref_times, ref_params, ref_rss) = (ours, theirs, p, rss);
            }
            _ => {
                for round in 0..o.rounds.max(1) {
                    let first = round == 0;
                    let reference = match o.python {
                        Some(py) => Some(reference(py, repo, &case, o.iters, o.threads, o.profile && first)?),
                        None => None,
                    };
                    let (t, p, ops) = ours(&case, o.iters, o.profile && first)?;
                    ours_times.push(t);
                    if first {
                        (params, our_ops) = (p, ops);
                    }
                    if let Some((s, p, ops, m)) = reference {
                        ref_times.push(s);
                        ratios.push(s / t);
                        if first {
                            (ref_params, ref_ops, ref_rss) = (p, ops, m);
                        }
                    }
                }
            }
        }
        let peak_rss = if o.memory { Some((ours_peak_rss(&case)?, ref_rss)) } else { None };
        let ops = o.profile.then_some(OpProfile {
            ours: our_ops,
            reference: ref_ops,
        });
        let reference = (!ref_times.is_empty()).then(|| median(ref_times));
        rows.push(BenchRow {
            name: case.name.to_string(),
            params: if ref_params > 0 { ref_params } else { params },
            ours: median(ours_times),
            reference,
            ratios: if ratios.len() > 1 { ratios } else { Vec::new() },
            ratios_over,
            ops,
            peak_rss,
        });
    }
    Ok(rows)
}

/// `lo–hi` of the ratios, with the middle half (first to third quartile) from four on, so that one
/// outlying pair does not hide where most of them fall.
fn spread(ratios: &[f64]) -> String {
    let mut v = ratios.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let (Some(lo), Some(hi)) = (v.first(), v.last()) else { return "—".into() };
    let mut s = format!("{lo:.2}–{hi:.2}x");
    if v.len() >= 4 {
        let n = v.len();
        let (q1, q3) = (median(v[..n / 2].to_vec()), median(v[n.div_ceil(2)..].to_vec()));
        s.push_str(&format!(" (middle half {q1:.2}–{q3:.2}x)"));
    }
    s
}

pub fn table(rows: &[BenchRow], threads: usize) -> String {
    // With several measurements: the ratio is the median of their ratios, and a column gives their spread.
    let widest = rows.iter().max_by_key(|r| r.ratios.len());
    let mut s = format!(
        "| UNet config (CFG batch 2, f32, CPU, {threads} threads) | params | loramix s/step | diffusers s/step | ratio (diffusers / loramix) |"
    );
    let several = widest.filter(|r| r.ratios.len() > 1);
    if let Some(w) = several {
        s.push_str(&format!(" ratio range over {} {} |\n|---|---|---|---|---|---|\n", w.ratios.len(), w.ratios_over));
    } else {
        s.push_str("\n|---|---|---|---|---|\n");
    }
    for r in rows {
        let (d, ratio) = match r.reference {
            Some(d) if r.ratios.len() > 1 => (format!("{d:.4}"), format!("{:.2}x", median(r.ratios.clone()))),
            Some(d) => (format!("{d:.4}"), format!("{:.2}x", d / r.ours)),
            None => ("—".into(), "—".into()),
        };
        s.push_str(&format!(
            "| {} | {:.1}M | {:.4} | {d} | {ratio} |",
            r.name,
            r.params as f64 / 1e6,
            r.ours
        ));
        if several.is_some() {
            s.push_str(&format!(" {} |", spread(&r.ratios)));
        }
        s.push('\n');
    }
    if rows.iter().any(|r| r.peak_rss.is_some()) {
        s.push_str("\nPeak resident memory of a process that loads the UNet (f32) and steps it (MB; ours in a fresh process, one step; diffusers' after its timed steps, torch's own libraries included)\n\n| UNet config | loramix MB | diffusers MB | ratio (loramix / diffusers) |\n|---|---|---|---|\n");
        for r in rows {
            let Some((o, d)) = r.peak_rss else { continue };
            let f = |v: Option<f64>| v.map(|v| format!("{v:.0}")).unwrap_or_else(|| "—".into());
            let ratio = match (o, d) {
                (Some(o), Some(d)) if d > 0.0 => format!("{:.2}x", o / d),
                _ => "—".into(),
            };
            s.push_str(&format!("| {} | {} | {} | {ratio} |\n", r.name, f(o), f(d)));
        }
    }
    for r in rows {
        if let Some(ops) = &r.ops {
            s.push_str(&format!(
                "\nPer op, {} (ms per step; torch.profiler self time on the reference side)\n\n",
                r.name
            ));
            s.push_str(&op_table(ops));
        }
    }
    s
}

/// One row per op kind, largest reference time first isn't used: a fixed order keeps configs
/// comparable. A kind neither side ran is left out.
fn op_table(ops: &OpProfile) -> String {
    let mut s = String::from(
        "| op | loramix ms | diffusers ms | ratio (diffusers / loramix) |\n|---|---|---|---|\n",
    );
    let fmt = |v: Option<&f64>| v.map(|v| format!("{v:.1}")).unwrap_or_else(|| "—".into());
    let mut kinds: Vec<&str> = OP_KINDS.to_vec();
    kinds.push("other");
    let (mut ours_total, mut ref_total) = (0.0, 0.0);
    for k in kinds {
        let (o, r) = (ops.ours.get(k), ops.reference.get(k));
        if o.is_none() && r.is_none() {
            continue;
        }
        ours_total += o.copied().unwrap_or(0.0);
        ref_total += r.copied().unwrap_or(0.0);
        let ratio = match (o, r) {
            (Some(o), Some(r)) if *o > 0.0 => format!("{:.2}x", r / o),
            _ => "—".into(),
        };
        s.push_str(&format!("| {k} | {} | {} | {ratio} |\n", fmt(o), fmt(r)));
    }
    let total_ratio = if ours_total > 0.0 && ref_total > 0.0 {
        format!("{:.2}x", ref_total / ours_total)
    } else {
        "—".into()
    };
    s.push_str(&format!(
        "| total | {ours_total:.1} | {} | {total_ratio} |\n",
        if ref_total > 0.0 {
            format!("{ref_total:.1}")
        } else {
            "—".into()
        }
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, ours: f64, reference: Option<f64>, ratios: Vec<f64>) -> BenchRow {
        BenchRow { name: name.into(), params: 1_000_000, ours, reference, ratios, ratios_over: "rounds", ops: None, peak_rss: None }
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(vec![7.0]), 7.0);
    }

    /// One round: the ratio of the two figures, five columns. Several: the median of the rounds'
    /// ratios (not the ratio of the medians) and their range in a sixth column.
    #[test]
    fn table_shows_the_rounds_spread() {
        let one = table(&[row("a", 2.0, Some(3.0), Vec::new())], 2);
        assert!(one.contains("| a | 1.0M | 2.0000 | 3.0000 | 1.50x |\n"), "{one}");
        assert!(!one.contains("rounds"));
        let three = table(&[row("a", 2.0, Some(3.0), vec![1.2, 1.6, 1.1]), row("b", 1.0, None, Vec::new())], 2);
        assert!(three.contains("ratio range over 3 rounds |\n|---|---|---|---|---|---|\n"), "{three}");
        assert!(three.contains("| a | 1.0M | 2.0000 | 3.0000 | 1.20x | 1.10–1.60x |\n"), "{three}");
        assert!(three.contains("| b | 1.0M | 1.0000 | — | — | — |\n"), "{three}");
    }

    /// Step pairs (`--alternate`): the header names them, and from four ratios on the column adds
    /// the middle half, which one outlier does not move.
    #[test]
    fn table_shows_the_middle_half_of_many_pairs() {
        let mut a = row("a", 2.0, Some(3.0), vec![1.30, 1.10, 0.60, 1.22, 1.26, 1.16, 1.40, 1.04]);
        a.ratios_over = "step pairs";
        let t = table(&[a], 2);
        assert!(t.contains("ratio range over 8 step pairs |"), "{t}");
        // Sorted: 0.60 1.04 1.10 1.16 | 1.22 1.26 1.30 1.40: median 1.19, quartiles 1.07 and 1.28.
        assert!(t.contains("| 1.19x | 0.60–1.40x (middle half 1.07–1.28x) |\n"), "{t}");
        assert_eq!(spread(&[1.0, 2.0, 3.0, 4.0, 5.0]), "1.00–5.00x (middle half 1.50–4.50x)");
        assert_eq!(spread(&[1.0, 2.0]), "1.00–2.00x");
    }
}
