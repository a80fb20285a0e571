//! `sagactl`: parse, run, print; exit codes in `ctl.rs`.

mod ctl;

use clap::Parser;
use ctl::{run, Cli};

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    match run(Cli::parse()).await {
        Ok(out) => {
            println!("{out}");
            std::process::ExitCode::SUCCESS
        }
        Err(f) => {
            eprintln!("sagactl: {}", f.message);
            std::process::ExitCode::from(f.code)
        }
    }
}
