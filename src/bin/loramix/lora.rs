//! `loramix lora`: the library from the command line (import, list, show, rm, rename, set;
//! `subspace` in `subspace.rs`).

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use loramix::lora::library::{ImportOutcome, LoraEntry, LoraLibrary, LoraQuery};
use loramix::lora::Role;

#[derive(clap::Args)]
pub struct LoraArgs {
    /// Library folder (default: $LORAMIX_HOME, else the platform data dir).
    #[arg(long, global = true)]
    library: Option<PathBuf>,
    #[command(subcommand)]
    command: LoraCommand,
}

#[derive(clap::Subcommand)]
enum EmbeddingCommand {
    /// Every embedding: name (the word that calls it), vectors, widths, format, hash.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove an embedding (by name or sha256 prefix).
    Rm { key: String },
    /// Rename an embedding: the new name is the word that calls it in prompts.
    Rename { key: String, new_name: String },
}

#[derive(clap::Subcommand)]
enum LoraCommand {
    /// Import LoRA files, textual-inversion embeddings (SDXL `clip_l`/`clip_g` files, diffusers
    /// `learned_embeds` folders) and folders of them (recursively); the same bytes twice are one entry.
    Import {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// One JSON object per file, as it is processed.
        #[arg(long)]
        json: bool,
    },
    /// The library's textual-inversion embeddings: list, remove, rename.
    Embedding {
        #[command(subcommand)]
        command: EmbeddingCommand,
    },
    /// List entries, optionally filtered.
    List {
        /// subject | style | unknown
        #[arg(long)]
        role: Option<String>,
        /// Base model id: sdxl, sd1, sd2, sdxl_refiner, ...
        #[arg(long)]
        base: Option<String>,
        /// A user tag or trigger word.
        #[arg(long)]
        tag: Option<String>,
        /// Text to find in names, titles, trigger words and tags.
        #[arg(long)]
        query: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Show one entry (by name, file name or sha256 prefix).
    Show {
        key: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove an entry and its stored file.
    Rm { key: String },
    /// Change the name used in <lora:NAME:weight>.
    Rename { key: String, new_name: String },
    /// Train a new LoRA from images and a prompt: as loadings on a subspace, or a normal LoRA.
    Train(Box<crate::train::TrainArgs>),
    /// EigenLoRAx subspaces: shared components per module, a few loadings per LoRA.
    Subspace {
        #[command(subcommand)]
        command: crate::subspace::SubspaceCommand,
    },
    /// Set the role and/or the user tags of an entry.
    Set {
        key: String,
        /// subject | style | unknown
        #[arg(long)]
        role: Option<String>,
        /// Comma-separated; replaces the current tags.
        #[arg(long)]
        tags: Option<String>,
    },
}

fn parse_role(s: &str) -> Result<Role> {
    Role::parse(s).ok_or_else(|| anyhow::anyhow!("--role {s}: expected subject, style, concept or unknown"))
}

fn print_entry(e: &LoraEntry) {
    let list = |v: &[String]| if v.is_empty() { "-".to_string() } else { v.join(", ") };
    println!("name:          {}", e.display_name);
    println!("file:          {}", e.file_name);
    println!("sha256:        {}", e.sha256);
    println!("addnet hash:   {}", &e.addnet_hash[..12]);
    println!("size:          {} bytes", e.size);
    println!("format:        {}", e.format);
    println!("ranks:         {:?}", e.ranks);
    println!("alphas:        {:?}", e.alphas);
    println!("base model:    {}", e.base_model);
    println!("modules:       {}", e.module_count);
    println!("role:          {}", e.role);
    println!("trigger words: {}", list(&e.trigger_words));
    println!("tags:          {}", list(&e.user_tags));
    if let Some(t) = &e.title {
        println!("title:         {t}");
    }
    println!("thumbnail:     {}", if e.thumbnail.is_some() { "yes" } else { "no" });
    println!("path:          {}", e.path.display());
}

pub fn run(a: LoraArgs) -> Result<()> {
    let root = match a.library {
        Some(r) => r,
        None => LoraLibrary::default_root()?,
    };
    let mut lib = LoraLibrary::open(&root)?;
    match a.command {
        LoraCommand::Subspace { command } => crate::subspace::run(&mut lib, command)?,
        LoraCommand::Train(t) => crate::train::run(&mut lib, *t)?,
        LoraCommand::Import { paths, json } => {
            let (mut added, mut existing, mut failed) = (0, 0, 0);
            let mut stdout = std::io::stdout().lock();
            lib.import(&paths, &mut |o| {
                let line = match o {
                    ImportOutcome::Added { source, entry } => {
                        added += 1;
                        format!("added    {} ({}, {}, {}) from {}", entry.display_name, entry.format, entry.base_model, &entry.sha256[..12], source.display())
                    }
                    ImportOutcome::Existing { source, entry } => {
                        existing += 1;
                        format!("exists   {} ({}) from {}", entry.display_name, &entry.sha256[..12], source.display())
                    }
                    ImportOutcome::Embedding { source, entry, existing: was } => {
                        if *was {
                            existing += 1;
                        } else {
                            added += 1;
                        }
                        let verb = if *was { "exists  " } else { "added   " };
                        format!(
                            "{verb} embedding {} ({}, {} vectors, {}) from {}",
                            entry.display_name, entry.format, entry.vectors, &entry.sha256[..12], source.display()
                        )
                    }
                    ImportOutcome::Failed { source, error } => {
                        failed += 1;
                        let _ = source;
                        format!("failed   {error}")
                    }
                };
                let line = if json { serde_json::to_string(o).unwrap_or_default() } else { line };
                let _ = writeln!(stdout, "{line}");
            })?;
            eprintln!("{added} added, {existing} already in the library, {failed} failed ({})", root.display());
            if failed > 0 {
                std::process::exit(1);
            }
        }
        LoraCommand::Embedding { command } => match command {
            EmbeddingCommand::List { json } => {
                let entries = lib.embeddings()?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&entries)?);
                } else {
                    for e in &entries {
                        let widths = e.widths.iter().map(|w| w.to_string()).collect::<Vec<_>>().join("/");
                        println!("{:<28} {:>2} vectors  {:<9} {:<9} {}", e.display_name, e.vectors, widths, e.format, &e.sha256[..12]);
                    }
                    eprintln!("{} embeddings", entries.len());
                }
            }
            EmbeddingCommand::Rm { key } => {
                let e = lib.remove_embedding(&key)?;
                println!("removed embedding {} ({})", e.display_name, &e.sha256[..12]);
            }
            EmbeddingCommand::Rename { key, new_name } => {
                let e = lib.rename_embedding(&key, &new_name)?;
                println!("renamed embedding to {} ({})", e.display_name, &e.sha256[..12]);
            }
        },
        LoraCommand::List { role, base, tag, query, json } => {
            let q = LoraQuery { text: query, role: role.as_deref().map(parse_role).transpose()?, base, tag };
            let entries = lib.list(&q)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&entries)?);
            } else {
                for e in &entries {
                    println!("{:<28} {:<8} {:<10} {:<9} r={:<8} {}", e.display_name, e.role, e.base_model, e.format, format!("{:?}", e.ranks), &e.sha256[..12]);
                }
                eprintln!("{} LoRAs", entries.len());
            }
        }
        LoraCommand::Show { key, json } => {
            let e = lib.resolve(&key)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&e)?);
            } else {
                print_entry(&e);
            }
        }
        LoraCommand::Rm { key } => {
            let e = lib.remove(&key)?;
            println!("removed {} ({})", e.display_name, &e.sha256[..12]);
        }
        LoraCommand::Rename { key, new_name } => {
            let e = lib.rename(&key, &new_name)?;
            println!("renamed to {}", e.display_name);
        }
        LoraCommand::Set { key, role, tags } => {
            if role.is_none() && tags.is_none() {
                anyhow::bail!("nothing to set: give --role and/or --tags");
            }
            if let Some(r) = role {
                lib.set_role(&key, parse_role(&r)?)?;
            }
            if let Some(t) = tags {
                let v: Vec<String> = t.split(',').map(str::to_string).collect();
                lib.set_tags(&key, &v)?;
            }
            print_entry(&lib.resolve(&key)?);
        }
    }
    Ok(())
}
