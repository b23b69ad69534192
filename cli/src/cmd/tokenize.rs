//! `pshard tokenize`: show how a text tokenizes, like llama.cpp's `llama-tokenize`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use pshard_model::gguf::ModelFile;
use pshard_tokenizer::Tokenizer;

/// Arguments of `pshard tokenize`.
#[derive(clap::Args)]
pub struct Args {
    /// The model (GGUF; the first part of a split model).
    #[arg(short = 'm', long = "model")]
    pub model: PathBuf,
    /// The text to tokenize.
    #[arg(
        short = 'p',
        long = "prompt",
        conflicts_with = "file",
        required_unless_present = "file"
    )]
    pub prompt: Option<String>,
    /// Read the text from a file instead (`-` for standard input).
    #[arg(short = 'f', long = "file")]
    pub file: Option<PathBuf>,
    /// Print only the ids, as a list: `[1, 2, 3]`.
    #[arg(long)]
    pub ids: bool,
    /// Do not add BOS (or EOS) even where the model asks for it.
    #[arg(long)]
    pub no_bos: bool,
    /// Tokenize control-token texts such as `<|im_start|>` as plain text.
    #[arg(long)]
    pub no_parse_special: bool,
    /// Print the number of tokens at the end.
    #[arg(long)]
    pub show_count: bool,
}

/// Runs the command.
pub fn run(args: Args) -> anyhow::Result<()> {
    let text = match (&args.prompt, &args.file) {
        (Some(p), _) => p.clone(),
        (None, Some(f)) => super::common::read_text(f)?,
        (None, None) => anyhow::bail!("give the text with -p TEXT or -f FILE"),
    };
    let file = ModelFile::open(&args.model)
        .with_context(|| format!("opening {}", args.model.display()))?;
    let tok = Tokenizer::from_gguf(file.header())
        .with_context(|| format!("reading the tokenizer of {}", args.model.display()))?;
    let ids = tok.encode(&text, !args.no_bos, !args.no_parse_special);
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if args.ids {
        writeln!(out, "{}", format_ids(&ids))?;
    } else {
        for &id in &ids {
            // Pieces are raw bytes (a piece may hold part of a UTF-8 character), written as they are.
            write!(out, "{id:6} -> '")?;
            out.write_all(tok.token_bytes(id))?;
            writeln!(out, "'")?;
        }
    }
    if args.show_count {
        writeln!(out, "Total number of tokens: {}", ids.len())?;
    }
    Ok(())
}

/// `[1, 2, 3]`.
fn format_ids(ids: &[u32]) -> String {
    let parts: Vec<String> = ids.iter().map(u32::to_string).collect();
    format!("[{}]", parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::format_ids;

    #[test]
    fn ids_print_as_a_python_list() {
        assert_eq!(format_ids(&[]), "[]");
        assert_eq!(format_ids(&[504, 2365, 6354]), "[504, 2365, 6354]");
    }
}
