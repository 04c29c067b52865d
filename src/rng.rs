//! A Gaussian generator bit-compatible with PyTorch's CPU generator.
//!
//! `torch.Generator("cpu").manual_seed(s)` followed by `torch.randn(shape)` (float32, at least
//! 16 elements — every latent tensor) is MT19937 producing 24-bit uniforms, turned into normals
//! by Box–Muller in blocks of 16. Reproducing it means a seed here gives the same starting noise
//! (and the same ancestral noise stream) as diffusers, ComfyUI and A1111's "CPU" noise source,
//! and it is device-independent: noise is drawn on the host and moved to the device.
//!
//! Why ours: no crate reproduces torch's generator bit for bit, and seeds that match diffusers'
//! and A1111's are the point. Shared by the SDXL sampler and the LLM's sampling.

/// MT19937 exactly as `std::mt19937` / ATen's `at::mt19937`.
#[derive(Clone)]
struct Mt19937 {
    state: [u32; 624],
    index: usize,
}

impl Mt19937 {
    fn new(seed: u64) -> Self {
        let mut state = [0u32; 624];
        state[0] = (seed & 0xffff_ffff) as u32;
        for i in 1..624 {
            state[i] = 1_812_433_253u32.wrapping_mul(state[i - 1] ^ (state[i - 1] >> 30)).wrapping_add(i as u32);
        }
        Self { state, index: 624 }
    }

    fn twist(&mut self) {
        for i in 0..624 {
            let y = (self.state[i] & 0x8000_0000) | (self.state[(i + 1) % 624] & 0x7fff_ffff);
            let mut v = self.state[(i + 397) % 624] ^ (y >> 1);
            if y & 1 != 0 {
                v ^= 0x9908_b0df;
            }
            self.state[i] = v;
        }
        self.index = 0;
    }

    fn next_u32(&mut self) -> u32 {
        if self.index >= 624 {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }
}

/// The generator state of one seeded run.
#[derive(Clone)]
pub struct TorchCpuRng {
    mt: Mt19937,
}

impl TorchCpuRng {
    pub fn new(seed: u64) -> Self {
        Self { mt: Mt19937::new(seed) }
    }

    /// A float uniform in [0, 1) from 24 random bits (ATen's `uniform_real_distribution<float>`).
    pub fn uniform(&mut self) -> f32 {
        (self.mt.next_u32() & 0x00ff_ffff) as f32 * (1.0 / 16_777_216.0)
    }

    fn normal_fill_16(data: &mut [f32]) {
        for j in 0..8 {
            let u1 = 1.0 - data[j];
            let u2 = data[j + 8];
            let radius = (-2.0 * u1.ln()).sqrt();
            let theta = 2.0 * std::f32::consts::PI * u2;
            data[j] = radius * theta.cos();
            data[j + 8] = radius * theta.sin();
        }
    }

    /// `n` standard normals, as `torch.randn(n)` draws them (for `n >= 16`). Smaller requests
    /// are filled from a 16-element draw, which keeps the stream deterministic but is not
    /// torch's scalar path.
    pub fn randn(&mut self, n: usize) -> Vec<f32> {
        if n < 16 {
            let mut v = self.randn(16);
            v.truncate(n);
            return v;
        }
        let mut data: Vec<f32> = (0..n).map(|_| self.uniform()).collect();
        let mut i = 0;
        while i + 16 <= n {
            Self::normal_fill_16(&mut data[i..i + 16]);
            i += 16;
        }
        if !n.is_multiple_of(16) {
            // torch recomputes the last 16 values from fresh uniforms.
            let tail = &mut data[n - 16..];
            for x in tail.iter_mut() {
                *x = self.uniform();
            }
            Self::normal_fill_16(tail);
        }
        data
    }
}

/// How the images of one batch take their noise.
///
/// Both conventions are in use, and a PNG must name its own to restore exactly: diffusers and
/// ComfyUI draw a batch from one generator, A1111, Forge and InvokeAI give image `k` the seed
/// `seed + k`, so that any image of a batch is the image its seed makes alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchSeeds {
    /// One generator for the batch (diffusers' `generator=`): image `k` draws after image `k - 1`.
    #[default]
    Shared,
    /// A1111's seeds: image `k` has seed `seed + k` and a generator of its own (diffusers'
    /// `generator=[…]`, one per image).
    PerImage,
}

impl BatchSeeds {
    /// The seed of image `k` of a batch whose first seed is `seed`.
    pub fn seed_of(self, seed: u64, k: usize) -> u64 {
        match self {
            Self::Shared => seed,
            Self::PerImage => seed.wrapping_add(k as u64),
        }
    }

    /// The same under a variation seed (`varied`: a strength above 0), where A1111 keeps every
    /// image on the job's seed (`all_seeds = [seed + (x if subseed_strength == 0 else 0) …]`)
    /// and only the variation seed advances: variations of one image.
    pub fn seed_of_varied(self, seed: u64, k: usize, varied: bool) -> u64 {
        if varied {
            seed
        } else {
            self.seed_of(seed, k)
        }
    }
}

impl std::str::FromStr for BatchSeeds {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().replace(['-', ' '], "_").as_str() {
            "shared" => Ok(Self::Shared),
            "per_image" => Ok(Self::PerImage),
            _ => Err(format!("batch seeds {s:?}: expected shared or per-image")),
        }
    }
}

/// The noise of one batch of `images` latents, drawn by its [`BatchSeeds`] convention.
#[derive(Clone)]
pub struct BatchNoise {
    /// One generator (shared) or one per image.
    generators: Vec<TorchCpuRng>,
    images: usize,
}

impl BatchNoise {
    pub fn new(seed: u64, images: usize, seeds: BatchSeeds) -> Self {
        Self::with_variation(seed, images, seeds, false)
    }

    /// A batch's noise when a variation seed may be set ([`BatchSeeds::seed_of_varied`]).
    pub fn with_variation(seed: u64, images: usize, seeds: BatchSeeds, varied: bool) -> Self {
        let images = images.max(1);
        let generators = match seeds {
            BatchSeeds::Shared => vec![TorchCpuRng::new(seed)],
            BatchSeeds::PerImage => (0..images).map(|k| TorchCpuRng::new(seeds.seed_of_varied(seed, k, varied))).collect(),
        };
        Self { generators, images }
    }

    pub fn per_image(&self) -> bool {
        self.generators.len() > 1
    }

    /// How many images the batch has.
    pub fn images(&self) -> usize {
        self.images
    }

    /// Standard normals for a tensor of `dims`, `dims[0]` images. Shared: one draw in order.
    /// Per image: each image's slice from its own generator, so `dims[0]` must be the batch
    /// size; `None` otherwise.
    pub fn randn(&mut self, dims: &[usize]) -> Option<Vec<f32>> {
        let total: usize = dims.iter().product();
        if !self.per_image() {
            return Some(self.generators[0].randn(total));
        }
        if dims.first() != Some(&self.generators.len()) {
            return None;
        }
        let each = total / self.generators.len();
        Some(self.generators.iter_mut().flat_map(|g| g.randn(each)).collect())
    }

    /// Advances every generator as a draw of `n` values per image would (shared: one draw of `n`).
    pub fn skip(&mut self, n: usize) {
        for g in &mut self.generators {
            g.randn(n);
        }
    }
}

/// A1111's variation seed ("Variation seed" / "Variation seed strength"; the API's `subseed` and
/// `subseed_strength`): each image's starting noise is spherically interpolated toward the noise
/// of a second seed. Image `k` of a per-image batch takes `seed + k`, as A1111's
/// `all_subseeds`, while its main seed stays the job's ([`BatchSeeds::seed_of_varied`]); a shared
/// batch draws its second noise from one generator, as it draws its first.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Variation {
    pub seed: u64,
    /// 0 = the image's own noise, 1 = the variation seed's.
    pub strength: f64,
}

impl Variation {
    /// `noise` (a batch of `dims = [images, channels, height, width]`) moved toward this seed's.
    pub fn apply(&self, noise: &[f32], dims: &[usize], seeds: BatchSeeds) -> Option<Vec<f32>> {
        let [b, c, h, w] = *dims else { return None };
        let mut sub = BatchNoise::new(self.seed, b, seeds);
        let high = sub.randn(dims)?;
        let each = c * h * w;
        if noise.len() != b * each {
            return None;
        }
        Some(noise.chunks(each).zip(high.chunks(each)).flat_map(|(lo, hi)| slerp_a1111(self.strength, lo, hi, c, h, w)).collect())
    }
}

/// `modules/rng.py` `slerp(val, low, high)` on one image's `[c, h, w]` noise, as A1111 computes
/// it: norms and dot products run along dim 1 (the rows), so each (channel, column) pair is
/// interpolated on its own; when the noises are nearly parallel on average it falls back to
/// `low·val + high·(1 − val)` (sic: the weights are the other way round from the slerp's).
fn slerp_a1111(val: f64, low: &[f32], high: &[f32], c: usize, h: usize, w: usize) -> Vec<f32> {
    let at = |ci: usize, hi: usize, wi: usize| (ci * h + hi) * w + wi;
    let mut dots = vec![0f32; c * w];
    for ci in 0..c {
        for wi in 0..w {
            let (mut nl, mut nh) = (0f32, 0f32);
            for hi in 0..h {
                nl += low[at(ci, hi, wi)] * low[at(ci, hi, wi)];
                nh += high[at(ci, hi, wi)] * high[at(ci, hi, wi)];
            }
            let (nl, nh) = (nl.sqrt(), nh.sqrt());
            dots[ci * w + wi] = (0..h).map(|hi| (low[at(ci, hi, wi)] / nl) * (high[at(ci, hi, wi)] / nh)).sum();
        }
    }
    let val32 = val as f32;
    if dots.iter().map(|&d| d as f64).sum::<f64>() / dots.len().max(1) as f64 > 0.9995 {
        return low.iter().zip(high).map(|(l, h)| l * val32 + h * (1.0 - val32)).collect();
    }
    let mut out = vec![0f32; low.len()];
    for ci in 0..c {
        for wi in 0..w {
            let omega = dots[ci * w + wi].acos();
            let so = omega.sin();
            let (kl, kh) = (((1.0 - val32) * omega).sin() / so, (val32 * omega).sin() / so);
            for hi in 0..h {
                let i = at(ci, hi, wi);
                out[i] = kl * low[i] + kh * high[i];
            }
        }
    }
    out
}

/// A batch's starting noise as A1111's `ImageRNG.first()` makes it. `rng` is the images' own
/// generator(s): it draws the noise at `dims` (`[images, c, h, w]`), and later draws (ancestral
/// noise) continue after it. In txt2img it is fresh, as A1111's; in img2img diffusers'
/// posterior sample has drawn from it first, which A1111 does not do. With a variation the
/// noise moves toward the variation seed's ([`Variation::apply`]).
///
/// `resize_from` (latent height and width) is A1111's "Resize seed from": the seed's noise as
/// it would be at that size (a fresh generator from `seed`, moved toward the variation seed's
/// noise at that size), pasted centred over the noise at `dims`, so that a seed found at one
/// size keeps its composition at another. A larger source is cropped around its centre; a
/// smaller one keeps the noise drawn at `dims` around it. The offsets are Python's floor
/// division, as A1111 writes them.
pub fn first_noise(rng: &mut BatchNoise, seed: u64, seeds: BatchSeeds, variation: Option<Variation>, dims: &[usize], resize_from: Option<(usize, usize)>) -> Option<Vec<f32>> {
    let full = rng.randn(dims)?;
    let [b, c, h, w] = *dims else { return None };
    let Some((rh, rw)) = resize_from.filter(|&r| r != (h, w) && r.0 > 0 && r.1 > 0) else {
        return match variation {
            Some(v) => v.apply(&full, dims, seeds),
            None => Some(full),
        };
    };
    let small_dims = [b, c, rh, rw];
    let small = BatchNoise::with_variation(seed, b, seeds, variation.is_some()).randn(&small_dims)?;
    let small = match variation {
        Some(v) => v.apply(&small, &small_dims, seeds)?,
        None => small,
    };
    let offset = |to: usize, from: usize| (to as i64 - from as i64).div_euclid(2);
    let (dy, dx) = (offset(h, rh), offset(w, rw));
    let rows = if dy >= 0 { rh } else { (rh as i64 + 2 * dy) as usize };
    let cols = if dx >= 0 { rw } else { (rw as i64 + 2 * dx) as usize };
    let (ty, tx) = (dy.max(0) as usize, dx.max(0) as usize);
    let (sy, sx) = ((-dy).max(0) as usize, (-dx).max(0) as usize);
    let mut out = full;
    for plane in 0..b * c {
        for r in 0..rows {
            let to = plane * h * w + (ty + r) * w + tx;
            let from = plane * rh * rw + (sy + r) * rw + sx;
            out[to..to + cols].copy_from_slice(&small[from..from + cols]);
        }
    }
    Some(out)
}

/// Fisher–Yates shuffle driven by our torch-compatible stream (deterministic for a seed).
pub fn shuffle<T>(v: &mut [T], rng: &mut TorchCpuRng) {
    for i in (1..v.len()).rev() {
        let j = ((rng.uniform() as f64) * (i + 1) as f64) as usize;
        v.swap(i, j.min(i));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mt19937_reference_value() {
        // The 10000th output of std::mt19937 seeded with 5489 is 4123659995 (C++ standard).
        let mut mt = Mt19937::new(5489);
        let mut last = 0;
        for _ in 0..10000 {
            last = mt.next_u32();
        }
        assert_eq!(last, 4_123_659_995);
    }

    #[test]
    fn torch_randn_values() {
        // torch.manual_seed(0); torch.randn(16)[:4] == [-1.1258, -1.1524, -0.2506, -0.4339]
        let v = TorchCpuRng::new(0).randn(16);
        let want = [-1.1258398f32, -1.1523602, -0.25057858, -0.43387884];
        for (a, b) in v.iter().zip(want) {
            assert!((a - b).abs() < 1e-5, "{v:?}");
        }
        // A length that is not a multiple of 16 recomputes the tail:
        // g = torch.Generator().manual_seed(0); torch.randn(20, generator=g)[-4:]
        let v = TorchCpuRng::new(0).randn(20);
        let want = [0.931_826_6f32, 1.259_009_2, 2.004_980_6, 0.053_736_9];
        for (a, b) in v[16..].iter().zip(want) {
            assert!((a - b).abs() < 1e-5, "{v:?}");
        }
    }

    /// `tests/fixtures/rng/{stem}.json` and every f32 tensor of `{stem}.safetensors`.
    fn goldens(stem: &str) -> (serde_json::Value, std::collections::HashMap<String, Vec<f32>>) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/rng");
        let meta = serde_json::from_slice(&std::fs::read(dir.join(format!("{stem}.json"))).unwrap()).unwrap();
        let bytes = std::fs::read(dir.join(format!("{stem}.safetensors"))).unwrap();
        let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let values = tensors.tensors().into_iter().map(|(n, t)| (n, t.data().chunks(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())).collect();
        (meta, values)
    }

    fn rel(got: &[f32], want: &[f32]) -> f64 {
        assert_eq!(got.len(), want.len());
        let (num, den) = got.iter().zip(want).fold((0f64, 0f64), |(n, d), (g, w)| (n + ((g - w) as f64).powi(2), d + (*w as f64).powi(2)));
        (num / den).sqrt()
    }

    /// A1111's "Resize seed from" against `tools/parity/make_seed_resize_fixtures.py`.
    #[test]
    fn seed_resize_equals_a1111() {
        let (meta, goldens) = goldens("seed_resize");
        let golden = |name: &str| goldens[name].clone();
        for (name, m) in meta.as_object().unwrap() {
            let dims: Vec<usize> = m["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
            let seed = m["seed"].as_u64().unwrap();
            let strength = m["strength"].as_f64().unwrap();
            let variation = (strength != 0.0).then(|| Variation { seed: m["subseed"].as_u64().unwrap(), strength });
            let f = m["factor"].as_u64().unwrap() as usize;
            let (fw, fh) = (m["from"][0].as_u64().unwrap() as usize, m["from"][1].as_u64().unwrap() as usize);
            let mut rng = BatchNoise::with_variation(seed, dims[0], BatchSeeds::PerImage, variation.is_some());
            let got = first_noise(&mut rng, seed, BatchSeeds::PerImage, variation, &dims, Some((fh / f, fw / f))).unwrap();
            let e = rel(&got, &golden(name));
            assert!(e < 1e-5, "{name}: relative L2 {e}");
            let e = rel(&rng.randn(&dims).unwrap(), &golden(&format!("{name}.after")));
            assert!(e < 1e-5, "{name}: the generators continue after the noise: relative L2 {e}");
        }
        // Without a resize it is the plain (varied) noise.
        let dims = [2, 4, 6, 6];
        let v = Variation { seed: 4, strength: 0.5 };
        let plain = v.apply(&BatchNoise::with_variation(8, 2, BatchSeeds::PerImage, true).randn(&dims).unwrap(), &dims, BatchSeeds::PerImage).unwrap();
        let mut rng = BatchNoise::with_variation(8, 2, BatchSeeds::PerImage, true);
        assert_eq!(first_noise(&mut rng, 8, BatchSeeds::PerImage, Some(v), &dims, None).unwrap(), plain);
    }

    /// A1111's variation seeds against `tools/parity/make_variation_fixtures.py`.
    #[test]
    fn variation_seeds_equal_a1111() {
        let (meta, goldens) = goldens("variation");
        for (name, m) in meta.as_object().unwrap() {
            let dims: Vec<usize> = m["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
            let seed = m["seed"].as_u64().unwrap();
            let v = Variation { seed: m["subseed"].as_u64().unwrap(), strength: m["strength"].as_f64().unwrap() };
            let mut noise = BatchNoise::with_variation(seed, dims[0], BatchSeeds::PerImage, true);
            let got = v.apply(&noise.randn(&dims).unwrap(), &dims, BatchSeeds::PerImage).unwrap();
            let e = rel(&got, &goldens[name]);
            assert!(e < 1e-5, "{name}: relative L2 {e}");
        }
        // Strength 1 is the variation seed's own noise.
        let dims = [2, 4, 8, 8];
        let own = BatchNoise::new(9, 2, BatchSeeds::PerImage).randn(&dims).unwrap();
        let moved = Variation { seed: 9, strength: 1.0 }.apply(&BatchNoise::new(3, 2, BatchSeeds::PerImage).randn(&dims).unwrap(), &dims, BatchSeeds::PerImage).unwrap();
        assert!(own.iter().zip(&moved).all(|(a, b)| (a - b).abs() < 1e-5));
    }
}
