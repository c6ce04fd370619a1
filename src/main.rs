//! The `courier` command line: `serve`, `keygen`, `json canonical|sign`, and
//! `user add`, `device add|delete|list` (which call the running server's admin API),
//! and `bench` (the delivery benchmark, `courier::bench`).
//!
//! Thin by design: parse arguments, call into the library, print the result alone on
//! stdout (logs go to stderr) and exit non-zero with a one-line error on failure.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use courier::admin_cli;
use courier::config::Config;
use courier::signing::{self, SigningKey, canonical};

/// mimalloc instead of glibc's malloc: in profiles of a loaded origin, glibc's
/// malloc/free (fragmented arenas: `malloc_consolidate`, `unlink_chunk`) took about a
/// quarter of the CPU; with mimalloc the same work took 25 % less CPU.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "courier",
    version,
    about = "A Matrix federation relay for to-device events"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve {
        #[arg(long, default_value = "config/courier.toml")]
        config: PathBuf,
    },
    /// Write a new signing key in Synapse's format (refuses to overwrite).
    Keygen {
        #[arg(long, default_value = "keys/signing.key")]
        out: PathBuf,
    },
    /// Canonical JSON and JSON signing, for debugging federation.
    Json {
        #[command(subcommand)]
        command: JsonCommand,
    },
    /// Local users, through the running server's admin API.
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
    /// Devices and their access tokens, through the running server's admin API.
    Device {
        #[command(subcommand)]
        command: DeviceCommand,
    },
    /// Outbound queues, and EDUs destinations refused, through the running server's
    /// admin API.
    Destination {
        #[command(subcommand)]
        command: DestinationCommand,
    },
    /// Transactions held in offload mode, and those the far side refused, through the
    /// running server's admin API.
    Offload {
        #[command(subcommand)]
        command: OffloadCommand,
    },
    /// Delivery-throughput benchmark: two couriers (and with --synapse two Synapses)
    /// on loopback; prints a table and one JSON line.
    Bench(courier::bench::Options),
}

#[derive(Subcommand)]
enum UserCommand {
    /// Create a user (`@name:server_name`); prints {"user_id","created"}.
    Add {
        user_id: String,
        #[arg(long, default_value = "config/courier.toml")]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum DeviceCommand {
    /// Create a device (and the user if needed), or give an existing one a new token;
    /// prints {"user_id","device_id","access_token"}.
    Add {
        user_id: String,
        /// The device ID; generated when absent.
        #[arg(long)]
        device: Option<String>,
        #[arg(long, default_value = "config/courier.toml")]
        config: PathBuf,
    },
    /// Delete a device, its access token and its pending messages.
    Delete {
        user_id: String,
        device_id: String,
        #[arg(long, default_value = "config/courier.toml")]
        config: PathBuf,
    },
    /// List a user's devices, with creation and last sync times.
    List {
        user_id: String,
        #[arg(long, default_value = "config/courier.toml")]
        config: PathBuf,
    },
}

/// Which page of a listing of parked entries.
#[derive(clap::Args)]
struct Page {
    /// Start after this position (a page's `next_from`).
    #[arg(long)]
    from: Option<u64>,
    /// Entries per page (at most 1000).
    #[arg(long, default_value_t = 100)]
    limit: usize,
}

#[derive(Subcommand)]
enum DestinationCommand {
    /// Every destination with work or delivery state: queued, parked, backoff.
    List {
        #[arg(long, default_value = "config/courier.toml")]
        config: PathBuf,
    },
    /// The EDUs a destination refused for good, with its answers (oldest first).
    Parked {
        destination: String,
        #[command(flatten)]
        page: Page,
        #[arg(long, default_value = "config/courier.toml")]
        config: PathBuf,
    },
    /// Put a destination's parked EDUs back at the end of its queue, to be delivered
    /// again; prints {"requeued": n}.
    Requeue {
        destination: String,
        #[arg(long, default_value = "config/courier.toml")]
        config: PathBuf,
    },
    /// Delete a destination's parked EDUs for good (logged and counted); prints
    /// {"discarded": n}.
    Discard {
        destination: String,
        #[arg(long, default_value = "config/courier.toml")]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum OffloadCommand {
    /// Every held queue, outbound (per destination) and inbound (per origin).
    List {
        #[arg(long, default_value = "config/courier.toml")]
        config: PathBuf,
    },
    /// The held transactions a queue's far side refused for good, with its answers.
    Parked {
        #[arg(value_parser = ["outbound", "inbound"])]
        direction: String,
        /// The destination (outbound) or origin (inbound) server name.
        queue: String,
        #[command(flatten)]
        page: Page,
        #[arg(long, default_value = "config/courier.toml")]
        config: PathBuf,
    },
    /// Put a queue's parked transactions back at its end, to be replayed verbatim
    /// again; prints {"requeued": n, "not_requeueable": m}.
    Requeue {
        #[arg(value_parser = ["outbound", "inbound"])]
        direction: String,
        queue: String,
        #[arg(long, default_value = "config/courier.toml")]
        config: PathBuf,
    },
    /// Delete a queue's parked transactions for good (logged and counted); prints
    /// {"discarded": n}.
    Discard {
        #[arg(value_parser = ["outbound", "inbound"])]
        direction: String,
        queue: String,
        #[arg(long, default_value = "config/courier.toml")]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum JsonCommand {
    /// Read one JSON value on stdin, write its canonical form.
    Canonical,
    /// Read a JSON object on stdin, write it signed, in canonical form.
    Sign {
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        server_name: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("courier: {}", chain.join(": "));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve { config } => serve(config),
        Command::Keygen { out } => {
            let key = SigningKey::generate(&signing::keyfile::new_key_version())?;
            signing::keyfile::write_new(&out, &key)?;
            println!("{}", key.key_id());
            Ok(())
        }
        Command::Json { command } => {
            let mut input = String::new();
            std::io::stdin().read_to_string(&mut input)?;
            let value = canonical::parse_strict(&input)?;
            match command {
                JsonCommand::Canonical => {
                    println!("{}", canonical::to_canonical_string(&value)?);
                }
                JsonCommand::Sign { key, server_name } => {
                    let key = signing::keyfile::read(&key)?;
                    let serde_json::Value::Object(mut obj) = value else {
                        anyhow::bail!("input is not a JSON object");
                    };
                    signing::sign_json(
                        &mut obj,
                        &server_name,
                        &key,
                        canonical::NumberMode::Strict,
                    )?;
                    let out = canonical::to_canonical_string(&serde_json::Value::Object(obj))?;
                    println!("{out}");
                }
            }
            Ok(())
        }
        Command::User { command } => match command {
            UserCommand::Add { user_id, config } => {
                admin(&config, admin_cli::Command::UserAdd { user_id })
            }
        },
        Command::Bench(options) => {
            // Before the simulated destinations and the servers (which inherit it).
            if let courier::limits::OpenFiles::Unchanged(why) = courier::limits::raise_open_files()
            {
                eprintln!("courier bench: {why}");
            }
            courier::bench::main(options)
        }
        Command::Device { command } => match command {
            DeviceCommand::Add {
                user_id,
                device,
                config,
            } => admin(
                &config,
                admin_cli::Command::DeviceAdd {
                    user_id,
                    device_id: device,
                },
            ),
            DeviceCommand::Delete {
                user_id,
                device_id,
                config,
            } => admin(
                &config,
                admin_cli::Command::DeviceDelete { user_id, device_id },
            ),
            DeviceCommand::List { user_id, config } => {
                admin(&config, admin_cli::Command::DeviceList { user_id })
            }
        },
        Command::Offload { command } => match command {
            OffloadCommand::List { config } => admin(&config, admin_cli::Command::OffloadList),
            OffloadCommand::Parked {
                direction,
                queue,
                page: Page { from, limit },
                config,
            } => admin(
                &config,
                admin_cli::Command::OffloadParked {
                    direction,
                    queue,
                    from,
                    limit,
                },
            ),
            OffloadCommand::Requeue {
                direction,
                queue,
                config,
            } => admin(
                &config,
                admin_cli::Command::OffloadRequeue { direction, queue },
            ),
            OffloadCommand::Discard {
                direction,
                queue,
                config,
            } => admin(
                &config,
                admin_cli::Command::OffloadDiscard { direction, queue },
            ),
        },
        Command::Destination { command } => match command {
            DestinationCommand::List { config } => {
                admin(&config, admin_cli::Command::DestinationList)
            }
            DestinationCommand::Parked {
                destination,
                page: Page { from, limit },
                config,
            } => admin(
                &config,
                admin_cli::Command::DestinationParked {
                    destination,
                    from,
                    limit,
                },
            ),
            DestinationCommand::Requeue {
                destination,
                config,
            } => admin(
                &config,
                admin_cli::Command::DestinationRequeue { destination },
            ),
            DestinationCommand::Discard {
                destination,
                config,
            } => admin(
                &config,
                admin_cli::Command::DestinationDiscard { destination },
            ),
        },
    }
}

/// Runs one admin command against the server `config_path` describes; prints its
/// JSON answer alone on one line.
fn admin(config_path: &std::path::Path, command: admin_cli::Command) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let answer = runtime.block_on(admin_cli::run(&config, &command))?;
    println!("{}", serde_json::to_string(&answer)?);
    Ok(())
}

fn serve(config_path: PathBuf) -> anyhow::Result<()> {
    // Before the runtime and the store allocate: a server's memory, not a test's.
    let huge_pages = courier::memory::avoid_transparent_huge_pages();
    let open_files = courier::limits::raise_open_files();
    let config = Config::load(&config_path)?;
    courier::logging::init(&config.log)?;
    huge_pages.log();
    open_files.log();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let app = courier::server::open(config)?;
        courier::server::run(app, courier::server::shutdown_signal()).await
    })
}
