//! `cargo bench --bench delivery`: the default benchmark scenario (one-to-one, two
//! couriers on loopback) at a small size, through the library (`courier::bench`). The
//! main command is `courier bench` (see README "Benchmark"); this target only keeps
//! the library path exercised and gives a quick figure.
//!
//! Under `cargo test --all-targets` (no `--bench` argument) it runs a smoke-sized
//! version. It never asserts on timings and never leaves a server running.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let benching = std::env::args().any(|a| a == "--bench");
    let messages = if benching { "2000" } else { "100" };
    let options = match courier::bench::Options::try_parse_from([
        "bench",
        "--messages",
        messages,
        "--concurrency",
        "16",
        "--courier-bin",
        env!("CARGO_BIN_EXE_courier"),
    ]) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("delivery bench: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("delivery bench: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(courier::bench::run(&options)) {
        Ok(report) => {
            print!("{}", courier::bench::table(&report));
            let c = &report.courier;
            if c.delivered == c.expected() && c.duplicates == 0 {
                std::process::ExitCode::SUCCESS
            } else {
                eprintln!(
                    "delivery bench: {} of {} delivered",
                    c.delivered,
                    c.expected()
                );
                std::process::ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("delivery bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
