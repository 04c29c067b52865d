//! `loramix bench --suite chameleon`: ChameleonLLM on the shipped LLM (models/minichat).
//! Held-out perplexity of a mixed-domain test file (four task domains and plain documents) with
//! the LM head adapted in seven ways. Every adaptation trains on the same training file with the
//! same optimiser, learning rate, batch size and epochs; the base model stays frozen.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use loramix::error::Result;
use loramix::llm::chameleon::{
    batch_feature, cluster_batches, head_nll, kmeans, kmeans_plus_plus, train_hypernetwork, ChameleonTrainOptions, HeadExample,
    HyperNetwork,
};
use loramix::llm::data::read_examples;
use loramix::llm::LlmSession;
use loramix::rng::{shuffle, TorchCpuRng};

pub struct Row {
    pub name: String,
    pub params: usize,
    pub ppl: f64,
}

pub struct Report {
    pub rows: Vec<Row>,
    pub train_n: usize,
    pub test_n: usize,
    pub clusters: usize,
    pub batch: usize,
}

/// A static LoRA on the head (A `[r, d]`, B `[V, r]`), trained on `batches` of examples.
fn train_static(w: &Tensor, ex: &[HeadExample], members: &[usize], rank: usize, opts: &ChameleonTrainOptions, seed: u64) -> Result<(Tensor, Tensor)> {
    let (v, d) = w.dims2()?;
    let dev = w.device();
    let mut rng = TorchCpuRng::new(seed);
    let a = Var::from_tensor(&Tensor::from_vec(rng.randn(rank * d), (rank, d), dev)?.affine(0.01, 0.0)?)?;
    let b = Var::from_tensor(&Tensor::from_vec(rng.randn(v * rank), (v, rank), dev)?.affine(0.01, 0.0)?)?;
    let mut opt = AdamW::new(vec![a.clone(), b.clone()], ParamsAdamW { lr: opts.lr, weight_decay: 0.0, ..Default::default() })?;
    let mut order = members.to_vec();
    for _ in 0..opts.epochs {
        shuffle(&mut order, &mut rng);
        for ch in order.chunks(opts.batch) {
            let batch: Vec<&HeadExample> = ch.iter().map(|&i| &ex[i]).collect();
            let (nll, n) = head_nll(w, Some((a.as_tensor(), b.as_tensor(), opts.scale)), &batch)?;
            opt.backward_step(&(nll / n as f64)?)?;
        }
    }
    Ok((a.as_tensor().detach(), b.as_tensor().detach()))
}

fn ppl(total: (f64, usize)) -> f64 {
    (total.0 / total.1.max(1) as f64).exp()
}

fn add(acc: &mut (f64, usize), x: (Tensor, usize)) -> Result<()> {
    acc.0 += x.0.to_scalar::<f32>()? as f64;
    acc.1 += x.1;
    Ok(())
}

fn hyper_ppl(w: &Tensor, net: &HyperNetwork, test: &[HeadExample], batches: &[Vec<usize>], dev: &Device) -> Result<f64> {
    let mut acc = (0.0, 0);
    for b in batches {
        let members: Vec<&HeadExample> = b.iter().map(|&i| &test[i]).collect();
        let f = batch_feature(&members.iter().map(|e| e.feature.as_slice()).collect::<Vec<_>>(), dev)?;
        let (a, bm) = net.forward(&f)?;
        add(&mut acc, head_nll(w, Some((&a, &bm, net.scale)), &members)?)?;
    }
    Ok(ppl(acc))
}

pub fn run(repo: &std::path::Path, quick: bool) -> Result<Report> {
    let root = repo.join("models/minichat");
    let dev = Device::Cpu;
    let s = LlmSession::load(&root.to_string_lossy(), &dev)?;
    let tr_path = root.join("data/lm_train.jsonl");
    let te_path = root.join("data/lm_test.jsonl");
    let mut tr_lines = read_examples(&tr_path)?;
    let mut te_lines = read_examples(&te_path)?;
    if quick {
        tr_lines.truncate(300);
        te_lines.truncate(60);
    }
    let train = s.head_examples(&tr_lines, &tr_path)?;
    let test = s.head_examples(&te_lines, &te_path)?;
    let w = s.head_weight()?;
    let (v, d) = w.dims2()?;
    let opts = ChameleonTrainOptions { epochs: if quick { 1 } else { 8 }, ..Default::default() };
    let k = opts.clusters;
    let all: Vec<usize> = (0..train.len()).collect();
    let mut rows = vec![];
    let eval_static = |a: &Tensor, b: &Tensor| -> Result<f64> {
        let mut acc = (0.0, 0);
        for ch in (0..test.len()).collect::<Vec<_>>().chunks(32) {
            let batch: Vec<&HeadExample> = ch.iter().map(|&i| &test[i]).collect();
            add(&mut acc, head_nll(&w, Some((a, b, opts.scale)), &batch)?)?;
        }
        Ok(ppl(acc))
    };
    let mut base = (0.0, 0);
    for ch in (0..test.len()).collect::<Vec<_>>().chunks(32) {
        let batch: Vec<&HeadExample> = ch.iter().map(|&i| &test[i]).collect();
        add(&mut base, head_nll(&w, None, &batch)?)?;
    }
    rows.push(Row { name: "base model".into(), params: 0, ppl: ppl(base) });
    let (a, b) = train_static(&w, &train, &all, opts.rank, &opts, 1)?;
    rows.push(Row { name: format!("static LM-head LoRA, rank {}", opts.rank), params: opts.rank * (d + v), ppl: eval_static(&a, &b)? });
    let net0 = HyperNetwork::init(d, v, opts.rank, opts.scale, opts.seed, &dev)?;
    let hyper_params = net0.parameter_count();
    let matched = (hyper_params / (d + v)).clamp(1, d.min(v));
    let (a, b) = train_static(&w, &train, &all, matched, &opts, 2)?;
    rows.push(Row { name: format!("static LoRA with the hypernetwork's parameters (rank {matched})"), params: matched * (d + v), ppl: eval_static(&a, &b)? });
    // One static LoRA per k-means cluster of the training set; test rows go to the nearest centre.
    let feats: Vec<Vec<f32>> = train.iter().map(|e| e.feature.clone()).collect();
    let (labels, centres) = kmeans(&feats, &kmeans_plus_plus(&feats, k, opts.seed), 10);
    let test_feats: Vec<Vec<f32>> = test.iter().map(|e| e.feature.clone()).collect();
    let (test_nearest, _) = kmeans(&test_feats, &centres, 0);
    let mut acc = (0.0, 0);
    for c in 0..k {
        let members: Vec<usize> = (0..train.len()).filter(|&i| labels[i] == c).collect();
        let tmembers: Vec<&HeadExample> = (0..test.len()).filter(|&i| test_nearest[i] == c).map(|i| &test[i]).collect();
        if members.is_empty() || tmembers.is_empty() {
            continue;
        }
        let (a, b) = train_static(&w, &train, &members, opts.rank, &opts, 10 + c as u64)?;
        add(&mut acc, head_nll(&w, Some((&a, &b, opts.scale)), &tmembers)?)?;
    }
    rows.push(Row { name: format!("one static rank-{} LoRA per k-means cluster ({k})", opts.rank), params: k * opts.rank * (d + v), ppl: ppl(acc) });
    let net = train_hypernetwork(&w, &train, &opts, net0, &mut |_| true)?;
    // Inference batches: the test set clustered (k-means, k clusters), each cluster in runs of
    // `batch`; or random runs of `batch`; or one prompt at a time.
    let init = kmeans_plus_plus(&test_feats, k, opts.seed);
    let (tl, _) = kmeans(&test_feats, &init, 10);
    let clustered = cluster_batches(&tl, opts.batch, &mut TorchCpuRng::new(5));
    let mut idx: Vec<usize> = (0..test.len()).collect();
    shuffle(&mut idx, &mut TorchCpuRng::new(6));
    let random: Vec<Vec<usize>> = idx.chunks(opts.batch).map(|c| c.to_vec()).collect();
    let single: Vec<Vec<usize>> = (0..test.len()).map(|i| vec![i]).collect();
    rows.push(Row { name: "hypernetwork, clustered batches (ChameleonLLM)".into(), params: hyper_params, ppl: hyper_ppl(&w, &net, &test, &clustered, &dev)? });
    rows.push(Row { name: "hypernetwork, random batches".into(), params: hyper_params, ppl: hyper_ppl(&w, &net, &test, &random, &dev)? });
    rows.push(Row { name: "hypernetwork, batch size 1".into(), params: hyper_params, ppl: hyper_ppl(&w, &net, &test, &single, &dev)? });
    let _ = DType::F32;
    Ok(Report { rows, train_n: train.len(), test_n: test.len(), clusters: k, batch: opts.batch })
}

pub fn table(r: &Report, threads: usize) -> String {
    let mut out = format!(
        "ChameleonLLM on models/minichat: held-out perplexity, {} test / {} training sequences (mixed domains), k = {} clusters, batches of {}; {threads} CPU threads\n\n| LM-head adaptation | trainable numbers | perplexity |\n|---|---|---|\n",
        r.test_n, r.train_n, r.clusters, r.batch
    );
    for row in &r.rows {
        out += &format!("| {} | {} | {:.4} |\n", row.name, row.params, row.ppl);
    }
    let get = |p: &str| r.rows.iter().find(|x| x.name.starts_with(p)).map_or(f64::NAN, |x| x.ppl);
    let clustered = get("hypernetwork, clustered");
    let random = get("hypernetwork, random");
    let matched = get("static LoRA with the hypernetwork's");
    out += &format!(
        "\nbatch awareness: clustered {clustered:.4} vs random batches {random:.4} ({}), vs the parameter-matched static LoRA {matched:.4} ({})\n",
        if clustered < random { "clustered is better" } else { "clustered is NOT better" },
        if clustered < matched { "clustered is better" } else { "clustered is NOT better" }
    );
    out
}
