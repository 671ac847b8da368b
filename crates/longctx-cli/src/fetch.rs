use anyhow::Result;

use crate::common::{announce_fetch, fetch_config, print_out};

#[derive(clap::Args)]
pub struct Args {
    /// Model name: smollm2 (SmolLM2 135M Instruct, Q4_1) or gemma3 (Gemma 3 270M base, Q4_K_M,
    /// trained at 32k context).
    #[arg(default_value = longctx::fetch::DEFAULT_MODEL)]
    name: String,
}

pub fn main(args: Args) -> Result<()> {
    announce_fetch(Some(&args.name));
    let path = longctx::fetch::fetch_with(&fetch_config(), &args.name)?;
    print_out(&path.display().to_string())
}
