//! `loramix lora subspace`: EigenLoRAx subspaces in the library (build, show, add, list, rm).

use anyhow::{Context, Result};
use loramix::lora::library::{LoraLibrary, SubspaceMember, SubspaceRequest, SubspaceSummary};
use loramix::lora::subspace::{Centering, ComponentRule, Storage};
use loramix::lora::AdapterTargets;
use loramix::{LoadOptions, SdxlPipeline};

#[derive(clap::Subcommand)]
pub enum SubspaceCommand {
    /// Build a subspace from library LoRAs of one base model: components once, loadings per member.
    Build {
        /// Members: library names or sha256 prefixes.
        members: Vec<String>,
        /// Every library LoRA (of --base, if given).
        #[arg(long)]
        all: bool,
        /// With --all: only LoRAs of this base model id (sdxl, sd1, ...).
        #[arg(long)]
        base: Option<String>,
        /// Keep K components per module and side.
        #[arg(long, conflicts_with = "energy")]
        components: Option<usize>,
        /// Keep the fewest components reaching this share of the energy (default 0.99).
        #[arg(long)]
        energy: Option<f64>,
        /// centred (mean subtracted and added back) or uncentred.
        #[arg(long, default_value = "uncentred")]
        centering: String,
        /// Storage precision of components and loadings: f16 (like LoRA files) or f32 (exact).
        #[arg(long, default_value = "f16")]
        dtype: String,
        /// Control for experiments: random orthonormal components (seeded) with the same K.
        #[arg(long)]
        random_basis: Option<u64>,
        #[arg(long)]
        name: String,
        /// The model whose layers the LoRAs are resolved against (default: the shipped miniworld).
        #[arg(long, default_value = "models/miniworld", value_parser = crate::model_arg)]
        model: String,
        #[arg(long)]
        json: bool,
    },
    /// Members, their ΔW errors (overall; per module with --modules) and the storage before and after.
    Show {
        name: String,
        #[arg(long)]
        modules: bool,
        #[arg(long)]
        json: bool,
    },
    /// Project a library LoRA that is not a member onto the subspace and report its error.
    Add {
        name: String,
        lora: String,
        #[arg(long, default_value = "models/miniworld", value_parser = crate::model_arg)]
        model: String,
        #[arg(long)]
        json: bool,
    },
    /// Every subspace, one line each.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Serve members whose ΔW error is at most --max-error from the subspace wherever their
    /// library name is used; the original files stay until you remove them.
    Replace {
        name: String,
        #[arg(long)]
        max_error: f64,
    },
    /// Serve replaced members from their original files again.
    Restore { name: String },
    /// Remove a subspace (the original LoRAs stay).
    Rm { name: String },
}

/// Only the model's layer table is needed (paths, kinds, shapes), so the model is loaded in f16:
/// half the memory of f32 for a full-size SDXL; no forward pass runs.
fn targets(model: &str) -> Result<AdapterTargets> {
    let opts = LoadOptions { dtype: candle_core::DType::F16, ..LoadOptions::default() };
    let pipe = SdxlPipeline::load(model, &opts).with_context(|| format!("loading model {model}"))?;
    Ok(AdapterTargets::of_pipeline(&pipe))
}

fn print_member(m: &SubspaceMember, modules: bool) {
    println!(
        "  {:<24} ΔW error {:.2e}  {} → {} bytes{}{}",
        m.display_name,
        m.error,
        m.original_bytes,
        m.loadings_bytes,
        if m.in_basis { "" } else { "  (projected in)" },
        match (m.original_present, m.replaced) {
            (true, false) => "",
            (true, true) => "  (replaces its original, which is kept)",
            (false, _) => "  (original removed)",
        }
    );
    if modules {
        for (path, e) in &m.module_errors {
            println!("      {e:.2e}  {path}");
        }
    } else if let Some((path, e)) = m.module_errors.iter().max_by(|a, b| a.1.total_cmp(b.1)) {
        println!("      worst module {e:.2e}  {path}");
    }
}

fn print_summary(s: &SubspaceSummary, modules: bool) {
    println!(
        "subspace {} ({}, {}, {}, {}, {} modules): {} members",
        s.name,
        s.base_model,
        s.centering.as_str(),
        s.storage.as_str(),
        s.rule.describe(),
        s.modules,
        s.members.len()
    );
    for m in &s.members {
        print_member(m, modules);
    }
    println!(
        "storage: {} bytes of originals → {} bytes (components {} + loadings), ratio {:.2}×",
        s.bytes_before, s.bytes_after, s.components_bytes, s.ratio
    );
}

pub fn run(lib: &mut LoraLibrary, command: SubspaceCommand) -> Result<()> {
    match command {
        SubspaceCommand::Build { members, all, base, components, energy, centering, dtype, random_basis, name, model, json } => {
            let rule = match (components, energy) {
                (Some(k), _) => ComponentRule::Fixed(k),
                (None, Some(e)) => ComponentRule::Energy(e),
                (None, None) => ComponentRule::Energy(0.99),
            };
            let req = SubspaceRequest { name: &name, members: &members, all, base: base.as_deref(), centering: Centering::parse(&centering)?, rule, storage: Storage::parse(&dtype)?, random_basis };
            if members.is_empty() && !all {
                anyhow::bail!("name the members (library names or hashes) or pass --all");
            }
            let s = lib.build_subspace(&req, &targets(&model)?)?;
            if json {
                println!("{}", serde_json::to_string(&s)?);
            } else {
                print_summary(&s, false);
            }
        }
        SubspaceCommand::Show { name, modules, json } => {
            let s = lib.subspace(&name)?;
            if json {
                println!("{}", serde_json::to_string(&s)?);
            } else {
                print_summary(&s, modules);
            }
        }
        SubspaceCommand::Add { name, lora, model, json } => {
            let m = lib.add_to_subspace(&name, &lora, &targets(&model)?)?;
            if json {
                println!("{}", serde_json::to_string(&m)?);
            } else {
                println!("added to subspace {name}:");
                print_member(&m, false);
            }
        }
        SubspaceCommand::List { json } => {
            let all = lib.subspaces()?;
            if json {
                println!("{}", serde_json::to_string(&all)?);
            } else {
                for s in &all {
                    println!("{}\t{}\t{} members\t{:.2}×", s.name, s.base_model, s.members.len(), s.ratio);
                }
            }
        }
        SubspaceCommand::Replace { name, max_error } => {
            let done = lib.replace_originals(&name, max_error)?;
            println!("{} member(s) of {name} now served from the subspace (originals kept):", done.len());
            for m in &done {
                print_member(m, false);
            }
        }
        SubspaceCommand::Restore { name } => {
            let n = lib.restore_originals(&name)?;
            println!("{n} member(s) of {name} served from their original files again");
        }
        SubspaceCommand::Rm { name } => {
            lib.remove_subspace(&name)?;
            println!("removed subspace {name}");
        }
    }
    Ok(())
}
