//! The `nanomoe` command line. Every error exits non-zero with one line on stderr.

mod cli;

fn main() {
    if let Err(e) = cli::run() {
        let msg = format!("{e:#}");
        let line = msg.lines().next().unwrap_or("error").trim_start_matches("error: ");
        eprintln!("error: {line}");
        std::process::exit(1);
    }
}
