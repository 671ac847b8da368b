use anyhow::Result;

use crate::common::announce_fetch;

#[derive(clap::Args)]
pub struct Args {
    /// Model name.
    #[arg(default_value = longctx::fetch::DEFAULT_MODEL)]
    name: String,
}

pub fn main(args: Args) -> Result<()> {
    announce_fetch(Some(&args.name));
    let path = longctx::fetch::fetch(&args.name)?;
    println!("{}", path.display());
    Ok(())
}
