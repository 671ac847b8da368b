use anyhow::Result;

use crate::common::{announce_fetch, print_out};

#[derive(clap::Args)]
pub struct Args {
    /// Model name.
    #[arg(default_value = longctx::fetch::DEFAULT_MODEL)]
    name: String,
}

pub fn main(args: Args) -> Result<()> {
    announce_fetch(Some(&args.name));
    let path = longctx::fetch::fetch(&args.name)?;
    print_out(&path.display().to_string())
}
