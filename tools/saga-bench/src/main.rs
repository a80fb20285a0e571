//! `saga-bench`: how many sagas per second `sagad` completes, at what
//! latency, and how many PostgreSQL commits and rows each costs, beside the
//! raw commit ceiling of the same database. Thin: the work is in `bench.rs`.

mod bench;
mod growth;
mod list_memory;

use clap::Parser;

// One thread: the load generator shares the machine's cores with sagad and
// PostgreSQL, and all its work is I/O. On two cores this cut its own CPU and
// the hops it adds to each saga (c = 1 p50 about 0.3 ms lower).
#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let args = bench::Args::parse();
    match bench::run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("saga-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
