//! The LoRA trainer: gradients reach every trainable tensor through the whole UNet (the fused
//! kernels switched to their references), and a run resumes from its checkpoint.

use std::collections::BTreeMap;
use std::path::PathBuf;

use loramix::lora::subspace::{self, Centering, ComponentRule, MemberFactors};
use loramix::lora::train::{self, TrainData, TrainOptions, Trainable};
use loramix::lora::{AdapterTargets, LoadedLora};
use loramix::{LoadOptions, SdxlPipeline};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn setup() -> (SdxlPipeline, AdapterTargets, TrainData) {
    let pipe = SdxlPipeline::load(root().join("models/miniworld").to_str().unwrap(), &LoadOptions::default()).unwrap();
    let targets = AdapterTargets::of_pipeline(&pipe);
    let imgs: Vec<(image::RgbImage, String)> = (0..2u8)
        .map(|i| (image::RgbImage::from_fn(64, 64, |x, y| image::Rgb([x as u8 * 3, y as u8 * 3, 100 * i])), format!("a zorp emblem {i}")))
        .collect();
    let data = TrainData::new(&pipe, &imgs, 64).unwrap();
    (pipe, targets, data)
}

fn snapshot(state: &train::TrainState) -> BTreeMap<String, Vec<f32>> {
    state.vars.iter().map(|(k, v)| (k.clone(), v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap())).collect()
}

#[test]
fn gradients_reach_every_trainable_tensor_and_runs_resume() {
    let (pipe, targets, data) = setup();
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("run.ckpt.safetensors");
    let opts = |steps| TrainOptions { steps, batch: 2, lr: 1e-2, seed: 5, checkpoint_every: 1 };
    for loadings in [false, true] {
        targets.clear();
        // A subspace of two shipped LoRAs for the loadings run.
        let members: Vec<MemberFactors> = ["vlox", "dotted"]
            .iter()
            .map(|n| {
                let l = LoadedLora::load(&root().join(format!("models/miniworld/loras/{n}.safetensors")), n, &targets).unwrap();
                subspace::member_factors(&l, &targets).unwrap()
            })
            .collect();
        let basis = subspace::build(&members, Centering::Uncentred, ComponentRule::Fixed(8)).unwrap();
        let trainable = if loadings { Trainable::Loadings { rank: 4, basis: &basis } } else { Trainable::Full { rank: 4, layers: vec![] } };
        let mut state = train::attach_trainable(&targets, &trainable, "t", 1).unwrap();
        let before = snapshot(&state);
        train::train(&pipe, &data, &mut state, &opts(2), &ckpt, &mut |_, l| l.is_finite()).unwrap();
        assert_eq!(state.step, 2);
        let after = snapshot(&state);
        for (k, v) in &before {
            assert!(v != &after[k], "loadings {loadings}: {k} did not change (no gradient reached it)");
        }
        // Resume: a fresh attach plus the checkpoint is the state at step 2, and it runs on.
        targets.clear();
        let mut resumed = train::attach_trainable(&targets, &trainable, "t", 1).unwrap();
        train::load_checkpoint(&mut resumed, &ckpt).unwrap();
        assert_eq!(resumed.step, 2);
        assert_eq!(snapshot(&resumed), after);
        train::train(&pipe, &data, &mut resumed, &opts(3), &ckpt, &mut |_, _| true).unwrap();
        assert_eq!(resumed.step, 3);
        // A checkpoint of another run is refused by name.
        targets.clear();
        let other = if loadings { Trainable::Full { rank: 4, layers: vec![] } } else { Trainable::Loadings { rank: 4, basis: &basis } };
        let mut wrong = train::attach_trainable(&targets, &other, "t", 1).unwrap();
        assert!(train::load_checkpoint(&mut wrong, &ckpt).unwrap_err().to_string().contains("another run"));
    }
    targets.clear();
    // The kernels are back to their fused paths after a run.
    assert!(!loramix_kernels::differentiable());
}
