//! `loramix bench --suite mix`: seconds per UNet step (CFG batch 2) for every mixing strategy
//! next to no LoRA and to two plain unfused LoRAs, on the mid-size SDXL-architecture UNet, plus
//! what the K-LoRA reference spends per step recomputing ΔW and top-K for every selector layer
//! (which we compute once per mix).

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use loramix_models::sdxl::{AddedConditions, UNet2DConditionConfig, UNet2DConditionModel};
use loramix_models::Adaptable;
use safetensors::tensor::{Dtype, TensorView};

use loramix::error::{Error, Result};
use loramix::lora::{keys::Component, AdapterTargets, LoadedLora, Role};
use loramix::mix::{self, stats, MixLora, MixOptions, MixPlan, Mixer};
use loramix::sdxl::model;
use loramix::sdxl::pipeline::StepMixer;

pub struct MixRow {
    pub name: String,
    pub seconds: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// A kohya LoRA of `rank` on every transformer linear of `unet`, deterministic per `seed`.
fn write_lora(unet: &UNet2DConditionModel, path: &Path, rank: usize, seed: u64) -> Result<()> {
    let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let f32s = |n: usize, k: u64| -> Vec<u8> {
        (0..n)
            .flat_map(|i| {
                let h = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ k.wrapping_mul(0xBF58_476D_1CE4_E5B9);
                let h = h ^ (h >> 29);
                (((h >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.05).to_le_bytes()
            })
            .collect()
    };
    for (i, l) in unet.adaptable_layers().iter().enumerate() {
        if l.kind != loramix_models::LayerKind::Linear || !l.path.contains("transformer_blocks") {
            continue;
        }
        let name = format!("lora_unet_{}", l.path.replace('.', "_"));
        let s = seed * 1_000_003 + i as u64;
        data.push((format!("{name}.lora_down.weight"), vec![rank, l.in_features], f32s(rank * l.in_features, s)));
        data.push((format!("{name}.lora_up.weight"), vec![l.out_features, rank], f32s(l.out_features * rank, s + 7)));
        data.push((format!("{name}.alpha"), vec![], (rank as f32).to_le_bytes().to_vec()));
    }
    let views: Vec<(String, TensorView)> = data
        .iter()
        .map(|(k, s, b)| TensorView::new(Dtype::F32, s.clone(), b).map(|v| (k.clone(), v)))
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| Error::Argument(format!("bench LoRA: {e}")))?;
    safetensors::serialize_to_file(views, None, path).map_err(|e| Error::Argument(format!("{}: {e}", path.display())))
}

pub fn run(repo: &Path, iters: usize) -> Result<(Vec<MixRow>, String)> {
    let unet_dir = repo.join("target/bench/mid/unet");
    if !unet_dir.is_dir() {
        return Err(Error::Argument(format!(
            "{} is missing: run `loramix bench --python PY` once (it creates the mid-size UNet)",
            unet_dir.display()
        )));
    }
    let (config_path, ws) = model::open_component(&repo.join("target/bench/mid"), "unet")?;
    let cfg: UNet2DConditionConfig = model::parse_config(&config_path)?;
    let dev = Device::Cpu;
    let unet = UNet2DConditionModel::new(ws.into_var_builder(DType::F32, &dev), &cfg).map_err(|e| Error::model(&unet_dir, e.to_string()))?;
    let work = repo.join("target/bench/mix");
    std::fs::create_dir_all(&work).map_err(|e| Error::io(&work, e))?;
    let (pc, ps) = (work.join("content.safetensors"), work.join("style.safetensors"));
    write_lora(&unet, &pc, 8, 1)?;
    write_lora(&unet, &ps, 8, 2)?;
    let targets = AdapterTargets::new(vec![(Component::Unet, unet.adaptable_layers())], &cfg, true, "mid");
    let content = LoadedLora::load(&pc, "content", &targets)?;
    let style = LoadedLora::load(&ps, "style", &targets)?;

    let (h, w) = (32, 32);
    let x = Tensor::randn(0f32, 1.0, (2, cfg.in_channels, h, w), &dev)?;
    let ctx = Tensor::randn(0f32, 1.0, (2, 77, cfg.cross_attention_dim), &dev)?;
    let proj = cfg.projection_class_embeddings_input_dim.unwrap_or(0).saturating_sub(6 * cfg.addition_time_embed_dim.unwrap_or(0));
    let added = AddedConditions {
        text_embeds: Tensor::randn(0f32, 1.0, (2, proj), &dev)?,
        time_ids: Tensor::from_slice(&[256f32, 256., 0., 0., 256., 256.], (1, 6), &dev)?.repeat((2, 1))?,
    };
    let forward = || -> Result<()> {
        unet.forward(&x, 500.0, &ctx, Some(&added))?;
        Ok(())
    };
    let time = |f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
        f()?;
        let mut v = Vec::new();
        for _ in 0..iters {
            let t = Instant::now();
            f()?;
            v.push(t.elapsed().as_secs_f64());
        }
        Ok(median(v))
    };
    let mut rows = Vec::new();
    rows.push(MixRow { name: "no LoRA".into(), seconds: time(&mut || forward())? });
    loramix::lora::attach(&targets, &[(&content, 1.0), (&style, 1.0)])?;
    rows.push(MixRow { name: "2 LoRAs, plain unfused".into(), seconds: time(&mut || forward())? });
    targets.clear();
    let steps = 30;
    // Every strategy as the pipeline runs it: `passes` then `apply` + UNet per pass; with
    // asymmetric CFG the LoRA passes on the conditional row and a base pass on the
    // unconditional one. `auto` with its subject located (regions from cross-attention) and
    // without (salience routing).
    let runs: Vec<(String, &str, Option<Vec<usize>>)> = mix::STRATEGIES
        .iter()
        .map(|s| (s.to_string(), *s, if *s == "auto" { Some(vec![2, 3]) } else { None }))
        .chain([("auto, no trigger in the prompt".to_string(), "auto", None)])
        .collect();
    for (label, strategy, subject_tokens) in runs {
        let mut plan = MixPlan::new(
            &targets,
            vec![
                MixLora { lora: content.clone(), role: Role::Subject, strength: 1.0, schedule: None },
                MixLora { lora: style.clone(), role: Role::Style, strength: 1.0, schedule: None },
            ],
        )?;
        plan.subject_tokens = subject_tokens.unwrap_or_default();
        let t0 = Instant::now();
        let est_previews = Some(mix::est::Previews { steps: 0, width: 0, height: 0, seed: 0, discrepancy: 0.3 });
        let mut mixer = Mixer::new(&targets, plan, mix::build(&MixOptions { strategy: strategy.into(), est_previews, ..Default::default() })?)?;
        let prepare = t0.elapsed().as_secs_f64();
        mixer.begin((h, w), 2, true)?;
        let asymmetric = mixer.asymmetric_cfg();
        let half = |t: &Tensor, i: usize| t.narrow(0, i, 1);
        // The context's rows made once, as the pipeline makes them (its cross-attentions keep
        // their keys and values while the same context tensor comes back).
        let ctx_rows = [half(&ctx, 0)?, half(&ctx, 1)?];
        let added_row = |i: usize| -> Result<AddedConditions> {
            Ok(AddedConditions { text_embeds: added.text_embeds.narrow(0, i, 1)?, time_ids: added.time_ids.narrow(0, i, 1)? })
        };
        let mut step = 0usize;
        let secs = time(&mut || {
            let passes = mixer.passes(step % steps, steps, 500.0)?;
            for p in 0..passes {
                mixer.apply(step % steps, p)?;
                if asymmetric {
                    unet.forward(&half(&x, 1)?, 500.0, &ctx_rows[1], Some(&added_row(1)?))?;
                } else {
                    forward()?;
                }
            }
            if asymmetric {
                mixer.apply_base()?;
                unet.forward(&half(&x, 0)?, 500.0, &ctx_rows[0], Some(&added_row(0)?))?;
            }
            step += 1;
            Ok(())
        })?;
        mixer.finish();
        rows.push(MixRow { name: format!("{label} (prepare once: {prepare:.2} s)"), seconds: secs });
    }
    // The reference recomputes ΔW = B A and a top-K for both LoRAs at every selector-layer call.
    let plan = MixPlan::new(&targets, vec![
        MixLora { lora: content.clone(), role: Role::Subject, strength: 1.0, schedule: None },
        MixLora { lora: style.clone(), role: Role::Style, strength: 1.0, schedule: None },
    ])?;
    let t = Instant::now();
    let mut calls = 0;
    for l in plan.layers.iter().filter(|l| l.is_attention_projection()) {
        if let (Some(a), Some(b)) = (l.modules[0], l.modules[1]) {
            let k = stats::module_rank(&content, a) * stats::module_rank(&style, b);
            stats::uncached(&content, a, false, stats::Stat::TopK(k))?;
            stats::uncached(&style, b, false, stats::Stat::TopK(k))?;
            calls += 1;
        }
    }
    let recompute = t.elapsed().as_secs_f64();
    let note = format!(
        "K-LoRA reference overhead: recomputing ΔW and top-K for both LoRAs at {calls} selector layers costs {recompute:.3} s per step on this UNet (we compute it once per mix and cache it)."
    );
    rows.push(MixRow { name: "K-LoRA reference: per-step recomputation only".into(), seconds: recompute });
    let note = format!("{note}\n{}", subspace_rows(&unet, &targets, &work, &mut rows, &mut || forward(), &time)?);
    let _ = std::fs::remove_dir_all(&work);
    Ok((rows, note))
}

/// Times a closure (median of the configured iterations after one warm-up call).
type Timer<'a> = dyn Fn(&mut dyn FnMut() -> Result<()>) -> Result<f64> + 'a;

/// EigenLoRAx members mixed through one shared basis (K = 16 per module side, uncentred,
/// built from 8 rank-8 LoRAs) against the same number of LoRAs as plain unfused branches, and
/// the time to switch a LoRA: its loadings into LoRA form vs reading its file.
fn subspace_rows(
    unet: &UNet2DConditionModel,
    targets: &AdapterTargets,
    work: &Path,
    rows: &mut Vec<MixRow>,
    forward: &mut dyn FnMut() -> Result<()>,
    time: &Timer<'_>,
) -> Result<String> {
    use loramix::lora::subspace::{self, Centering, ComponentRule, SharedForm, Storage};
    let k = 16;
    let mut originals = Vec::new();
    let mut factors = Vec::new();
    for i in 0..8 {
        let p = work.join(format!("member{i}.safetensors"));
        write_lora(unet, &p, 8, 11 + i)?;
        let l = LoadedLora::load(&p, &format!("m{i}"), targets)?;
        factors.push(subspace::member_factors(&l, targets)?);
        originals.push(l);
    }
    let basis = subspace::build(&factors, Centering::Uncentred, ComponentRule::Fixed(k))?;
    let bases = subspace::basis_tensors(&basis, targets)?;
    let mut members = Vec::new();
    let mut switch = Vec::new();
    for (i, f) in factors.iter().enumerate() {
        let (loadings, _) = subspace::project(&basis, f, Storage::F32)?;
        let t = Instant::now();
        let rec: subspace::MemberFactors = loadings.iter().map(|(p, l)| (p.clone(), basis[p].reconstruct(l))).collect();
        let shared = SharedForm { key: "bench", bases: &bases, loadings: &loadings };
        let m = subspace::lora_from_factors(&format!("s{i}"), Path::new("bench"), originals[i].info.clone(), String::new(), &rec, targets, Some(shared))?;
        switch.push((t.elapsed().as_secs_f64(), {
            let t = Instant::now();
            LoadedLora::load(&work.join(format!("member{i}.safetensors")), "x", targets)?;
            t.elapsed().as_secs_f64()
        }));
        members.push(m);
    }
    let mut shared_secs = Vec::new();
    for n in [1usize, 2, 4, 8] {
        let refs: Vec<(&LoadedLora, f64)> = originals.iter().take(n).map(|l| (l, 1.0)).collect();
        loramix::lora::attach(targets, &refs)?;
        rows.push(MixRow { name: format!("{n} LoRA(s), plain unfused branches"), seconds: time(forward)? });
        targets.clear();
        let refs: Vec<(&LoadedLora, f64)> = members.iter().take(n).map(|l| (l, 1.0)).collect();
        loramix::lora::attach(targets, &refs)?;
        let secs = time(forward)?;
        shared_secs.push(secs);
        rows.push(MixRow { name: format!("{n} member(s) of one subspace (K = {k}), shared basis"), seconds: secs });
        targets.clear();
    }
    let (sw, ld): (Vec<f64>, Vec<f64>) = switch.into_iter().unzip();
    Ok(format!(
        "Subspace: 8 members through the shared basis cost {:.2}x one member. Switching a LoRA: its loadings into LoRA form take {:.4} s, reading and resolving its file {:.4} s (medians of 8).",
        shared_secs[3] / shared_secs[0],
        median(sw),
        median(ld)
    ))
}

pub fn table(rows: &[MixRow], note: &str, threads: usize) -> String {
    let base = rows.first().map(|r| r.seconds).unwrap_or(f64::NAN);
    let plain = rows.get(1).map(|r| r.seconds).unwrap_or(f64::NAN);
    let mut s = format!(
        "| mid UNet, 256x256 px, CFG batch 2, f32, CPU, {threads} threads | s/step | vs no LoRA | vs plain unfused |\n|---|---|---|---|\n"
    );
    for r in rows {
        s.push_str(&format!("| {} | {:.4} | {:.2}x | {:.2}x |\n", r.name, r.seconds, r.seconds / base, r.seconds / plain));
    }
    s.push('\n');
    s.push_str(note);
    s.push('\n');
    s
}
