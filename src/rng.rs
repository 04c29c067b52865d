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
        let images = images.max(1);
        let generators = match seeds {
            BatchSeeds::Shared => vec![TorchCpuRng::new(seed)],
            BatchSeeds::PerImage => (0..images).map(|k| TorchCpuRng::new(seeds.seed_of(seed, k))).collect(),
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
}
