//! `sagad`: parse flags, set up logging, run the coordinator.

use clap::Parser;

// glibc's malloc was about 13% of sagad's CPU under load (perf); mimalloc
// keeps small, short-lived allocations per thread.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use saga_coordinator::{config::Config, server};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .init();
    let cfg = Config::parse();
    match server::run(cfg).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sagad: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
