//! `sagad`: parse flags, set up logging, run the coordinator.

use clap::Parser;

// glibc's malloc was about 13% of sagad's CPU under load (perf); mimalloc
// keeps small, short-lived allocations per thread.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use saga_coordinator::config::{Config, LogFormat};
use saga_coordinator::server;

fn main() -> std::process::ExitCode {
    let cfg = Config::parse();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if cfg.worker_threads > 0 {
        rt.worker_threads(cfg.worker_threads as usize);
    }
    match rt.enable_all().build() {
        Ok(rt) => rt.block_on(run(cfg)),
        Err(e) => {
            eprintln!("sagad: cannot start the runtime: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cfg: Config) -> std::process::ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let logs = tracing_subscriber::fmt().with_env_filter(filter);
    match cfg.log_format {
        LogFormat::Text => logs.with_ansi(ansi).init(),
        LogFormat::Json => logs
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
    match server::run(cfg).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sagad: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
