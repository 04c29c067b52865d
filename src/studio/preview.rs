//! Per-step previews: the tiny autoencoder (TAESD/TAESDXL) when its weights are present, else a
//! latent → RGB linear map fitted to the model's own VAE.

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::sdxl::pipeline::SdxlPipeline;

/// A latent → RGB linear map fitted to the model's own VAE (a few solid colours encoded once),
/// for per-step previews that cost nothing next to a UNet step.
#[derive(Debug, Clone)]
pub struct LatentPreview {
    /// `[3][c + 1]` (the last column is the bias).
    m: Vec<Vec<f32>>,
}

impl LatentPreview {
    pub fn fit(pipe: &SdxlPipeline) -> Result<Self> {
        let colours: [[f32; 3]; 10] = [
            [-1.0, -1.0, -1.0],
            [1.0, 1.0, 1.0],
            [1.0, -1.0, -1.0],
            [-1.0, 1.0, -1.0],
            [-1.0, -1.0, 1.0],
            [1.0, 1.0, -1.0],
            [-1.0, 1.0, 1.0],
            [1.0, -1.0, 1.0],
            [0.0, 0.0, 0.0],
            [0.4, -0.2, 0.1],
        ];
        let s = pipe.vae_scale_factor() * 4;
        let mut data = Vec::with_capacity(colours.len() * 3 * s * s);
        for c in &colours {
            for v in c {
                data.extend(std::iter::repeat_n(*v, s * s));
            }
        }
        let x = Tensor::from_vec(data, (colours.len(), 3, s, s), &pipe.device)?;
        let dist = pipe.vae()?.encode(&x.to_dtype(pipe.vae_dtype())?)?;
        let scale = pipe.vae()?.config().scaling_factor;
        let z = (dist.mean.to_dtype(DType::F32)? * scale)?.mean((2, 3))?.to_device(&Device::Cpu)?.to_vec2::<f32>()?;
        let c = z[0].len();
        // Least squares rgb = M [z; 1] via the normal equations (c + 1 unknowns per channel).
        let n = c + 1;
        let mut ata = vec![vec![0f64; n]; n];
        let mut atb = vec![vec![0f64; 3]; n];
        for (row, col) in z.iter().zip(&colours) {
            let a: Vec<f64> = row.iter().map(|&v| v as f64).chain(std::iter::once(1.0)).collect();
            for i in 0..n {
                for j in 0..n {
                    ata[i][j] += a[i] * a[j];
                }
                for k in 0..3 {
                    atb[i][k] += a[i] * col[k] as f64;
                }
            }
        }
        for (i, row) in ata.iter_mut().enumerate() {
            row[i] += 1e-6; // ridge: keeps the solve stable for degenerate VAEs
        }
        let sol = solve(ata, atb);
        let m = (0..3).map(|k| (0..n).map(|i| sol[i][k] as f32).collect()).collect();
        Ok(Self { m })
    }

    /// The first image of `latents` `[b, c, h, w]` as RGB at latent resolution.
    pub fn render(&self, latents: &Tensor) -> Result<image::RgbImage> {
        let z = latents.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        let (_, c, h, w) = z.dims4()?;
        let z = z.narrow(0, 0, 1)?.flatten_all()?.to_vec1::<f32>()?;
        let mut img = image::RgbImage::new(w as u32, h as u32);
        for y in 0..h {
            for x in 0..w {
                let mut px = [0u8; 3];
                for (k, p) in px.iter_mut().enumerate() {
                    let mut v = self.m[k][c];
                    for ch in 0..c {
                        v += self.m[k][ch] * z[ch * h * w + y * w + x];
                    }
                    *p = ((v * 0.5 + 0.5).clamp(0.0, 1.0) * 255.0).round() as u8;
                }
                img.put_pixel(x as u32, y as u32, image::Rgb(px));
            }
        }
        Ok(img)
    }
}

/// Per-step previews: the tiny autoencoder when its weights are present, else the linear map.
#[derive(Clone)]
pub enum Previewer {
    Linear(LatentPreview),
    Tiny(Arc<loramix_models::sdxl::taesd::TinyDecoder>),
}

impl Previewer {
    /// TAESD/TAESDXL weights in diffusers layout (`config.json` + `diffusion_pytorch_model.safetensors`)
    /// from the first of `dirs` that has them.
    pub fn find_tiny(dirs: &[PathBuf], device: &Device) -> Result<Option<Self>> {
        for d in dirs {
            let w = d.join("diffusion_pytorch_model.safetensors");
            let c = d.join("config.json");
            if w.exists() && c.exists() {
                let text = std::fs::read_to_string(&c).map_err(|e| Error::io(&c, e))?;
                let cfg: loramix_models::sdxl::taesd::TinyDecoderConfig =
                    serde_json::from_str(&text).map_err(|e| Error::model(&c, format!("not an AutoencoderTiny config: {e}")))?;
                let vb = crate::weights::WeightSource::from_files(&[w])?.into_var_builder(DType::F32, device);
                let dec = loramix_models::sdxl::taesd::TinyDecoder::new(vb, &cfg).map_err(|e| Error::model(d, e.to_string()))?;
                return Ok(Some(Self::Tiny(Arc::new(dec))));
            }
        }
        Ok(None)
    }

    pub fn render(&self, latents: &Tensor) -> Result<image::RgbImage> {
        match self {
            Self::Linear(l) => l.render(latents),
            Self::Tiny(t) => {
                let z = latents.narrow(0, 0, 1)?.to_dtype(DType::F32)?;
                let img = t.decode(&z)?;
                crate::sdxl::pipeline::to_images(&img)?.into_iter().next().ok_or_else(|| Error::Argument("empty preview".into()))
            }
        }
    }
}

/// `a x = b` for a square `a` and several right-hand sides, by faer's LU with partial pivoting.
fn solve(a: Vec<Vec<f64>>, b: Vec<Vec<f64>>) -> Vec<Vec<f64>> {
    use faer::linalg::solvers::Solve;
    let a = faer::Mat::from_fn(a.len(), a.len(), |i, j| a[i][j]);
    let b = faer::Mat::from_fn(b.len(), b.first().map_or(0, Vec::len), |i, j| b[i][j]);
    let x = a.partial_piv_lu().solve(&b);
    (0..x.nrows()).map(|i| (0..x.ncols()).map(|j| x[(i, j)]).collect()).collect()
}
