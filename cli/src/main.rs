//! The `pshard` command line.

fn main() {
    let cli = match pshard::parse(std::env::args_os()) {
        Ok(cli) => cli,
        Err(pshard::ParseError::Clap(e)) => e.exit(),
        Err(pshard::ParseError::Compat(e)) => {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    };
    match pshard::run(cli) {
        Ok(()) => {}
        // The reader of the output went away (`pshard … | head`): a normal end.
        Err(e) if pshard::is_broken_pipe(&e) => {}
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}
