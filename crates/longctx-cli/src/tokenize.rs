use std::path::PathBuf;

use anyhow::Result;

use crate::common::{print_out, read_text, ModelArgs};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    input: Input,
}

#[derive(clap::Args)]
#[group(required = true, multiple = false)]
struct Input {
    /// The text to tokenize.
    #[arg(long)]
    text: Option<String>,
    /// A file whose text to tokenize.
    #[arg(long, value_name = "PATH")]
    file: Option<PathBuf>,
}

pub fn main(args: Args) -> Result<()> {
    // clap guarantees exactly one of --text and --file.
    let text = match args.input.file {
        Some(path) => read_text(&path)?,
        None => args.input.text.unwrap_or_default(),
    };
    let model = args.model.load()?;
    // As llama.cpp's tokenizer tool does: the model decides about BOS, and special-token text
    // in the input becomes the special token.
    let ids = model.tokenizer.encode(&text, true, true)?;
    print_out(&serde_json::to_string(&ids)?)
}
