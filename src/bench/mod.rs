//! `courier bench`: delivery throughput and latency of to-device messages through
//! federation, courier -> courier, and (with `--synapse`) the same traffic through two
//! real Synapse homeservers, side by side.
//!
//! It starts the servers (`node`), creates the devices, warms federation up (keys),
//! runs a scenario with the same driver against either (`driver`), and reports a table
//! then one JSON line on stdout (`--json`: the JSON line alone); a progress line goes to
//! stderr (`progress`). Scenarios:
//! - `one-to-one`: one message per request to one named device, `--concurrency`
//!   requests in flight;
//! - `fan-out`: one message per request to `*` of a user with `--fanout` devices;
//! - `backlog`: the destination is killed while the messages queue on the origin, then
//!   restarted on the same data; the drain is measured from its restart;
//! - `many-destinations`: one request carries a message for each of `--fanout`
//!   destinations out of `--destinations` (1000) simulated servers (`destinations`),
//!   so the origin runs that many queues and delivery tasks at once.
//!
//! `--destinations D` runs D destination servers, messages spread round robin.
//!
//! This module owns the measuring and the report. It must never leave a server
//! running or a scratch folder behind (also on error or Ctrl-C), never send traffic
//! anywhere but 127.0.0.1, and never write anything but the report to stdout.

pub mod conn;
pub mod destinations;
pub mod driver;
pub mod histogram;
pub mod node;
pub mod progress;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use serde::Serialize;
use tokio::sync::watch;

use conn::Conn;
use destinations::Destinations;
use driver::{Received, SendPlan, Shared, Target};
use node::{Device, Node, Scratch, SynapseEnv};
use progress::{Goal, Progress};

/// How long delivery may make no progress before the run gives up on the rest.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Most sender devices on the origin (requests in flight share them beyond that).
const MAX_SENDER_DEVICES: usize = 16;

/// What `courier bench` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// One message per request, to one device.
    OneToOne,
    /// One request to every device (`*`) of a user with --fanout devices.
    FanOut,
    /// Queue while the destination is down, then measure the drain after its restart.
    Backlog,
    /// One request to --fanout of --destinations simulated servers.
    ManyDestinations,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::OneToOne => "one-to-one",
            Scenario::FanOut => "fan-out",
            Scenario::Backlog => "backlog",
            Scenario::ManyDestinations => "many-destinations",
        }
    }
}

/// The options of `courier bench`.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "bench")]
pub struct Options {
    /// What to measure.
    #[arg(long, value_enum, default_value_t = Scenario::OneToOne)]
    pub scenario: Scenario,
    /// Messages to send (without it: send for --duration seconds).
    #[arg(long)]
    pub messages: Option<u64>,
    /// Seconds to send for when --messages is not given.
    #[arg(long, default_value_t = 20)]
    pub duration: u64,
    /// Bytes of each message's content (serialized JSON, padded).
    #[arg(long, default_value_t = 256)]
    pub payload: usize,
    /// Devices per message (addressed as `*`); fan-out: 100 by default, else 1.
    /// many-destinations: destinations per message (100 by default).
    #[arg(long)]
    pub fanout: Option<usize>,
    /// sendToDevice requests in flight (at most).
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Send at this many messages per second (paced over all senders) instead of as
    /// fast as the origin accepts them: for latency at a given load.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Destination servers (messages spread round robin); many-destinations: 1000
    /// by default, else 1.
    #[arg(long)]
    pub destinations: Option<usize>,
    /// One-to-one: recipient devices per destination (messages spread round robin).
    #[arg(long, default_value_t = 8)]
    pub recipients: usize,
    /// Also run the same traffic through two Synapse homeservers and compare.
    #[arg(long)]
    pub synapse: bool,
    /// Print only the JSON line.
    #[arg(long)]
    pub json: bool,
    /// Keep each run's folder (the servers' configuration, data and logs:
    /// `A/courier.log`, `B/courier.log`) instead of removing it; its path is printed on
    /// stderr as `kept: <path>`. Set `RUST_LOG` (e.g. `courier=debug`) for the
    /// servers' per-transaction lines.
    #[arg(long)]
    pub keep: bool,
    /// Measure N times (courier and Synapse runs interleaved under --synapse) and
    /// report each server's run with the median msgs/s, with every run's msgs/s
    /// listed: these machines' figures move by ±25 % from one run to the next.
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
    /// The courier binary to start (default: this executable).
    #[arg(long)]
    pub courier_bin: Option<PathBuf>,
    /// Folder of the Synapse peer scripts (default: ../shared/peers/synapse).
    #[arg(long)]
    pub synapse_scripts: Option<PathBuf>,
}

impl Options {
    /// Devices per message, after the scenario's default.
    pub fn fanout(&self) -> usize {
        self.fanout.unwrap_or(match self.scenario {
            Scenario::FanOut | Scenario::ManyDestinations => 100,
            _ => 1,
        })
    }

    /// Destination servers, after the scenario's default.
    pub fn destinations(&self) -> usize {
        self.destinations.unwrap_or(match self.scenario {
            Scenario::ManyDestinations => 1000,
            _ => 1,
        })
    }

    /// Whether the destinations are simulated in-process (see `destinations`).
    fn simulated(&self) -> bool {
        self.scenario == Scenario::ManyDestinations
    }

    /// About how many files this process (and the receiving server, for the syncs)
    /// keeps open at once: a connection per request in flight, one per recipient
    /// device's sync, a listener and a connection per simulated destination, and
    /// room for the relays and the stores' files.
    fn open_files_needed(&self) -> u64 {
        let destinations = self.destinations() as u64;
        let (simulated, receivers) = if self.simulated() {
            (2 * destinations, 0)
        } else {
            let per_destination = match self.fanout() {
                1 => self.recipients,
                k => k,
            };
            (0, destinations * per_destination as u64)
        };
        simulated + receivers + self.concurrency as u64 + 256
    }

    /// Refuses at once a run this process could not open the files for (it would
    /// otherwise fail its warm-up after minutes with connection errors).
    fn check_open_files(&self, soft_limit: Option<u64>) -> anyhow::Result<()> {
        let need = self.open_files_needed();
        match soft_limit {
            Some(limit) if limit < need => bail!(
                "this run needs about {need} open files (one per request in flight and per \
                 recipient device, two per simulated destination) and this process may open \
                 {limit}: raise `ulimit -n` (courier raises its own limit to the hard one, \
                 `ulimit -Hn`, which is too low)"
            ),
            _ => Ok(()),
        }
    }

    fn validate(&self) -> anyhow::Result<()> {
        let fanout = self.fanout();
        if self.concurrency == 0 || self.concurrency > 4096 {
            bail!("--concurrency must be between 1 and 4096");
        }
        let destinations = self.destinations();
        if self.simulated() {
            if destinations == 0 || destinations > 5000 {
                bail!("--destinations must be between 1 and 5000 for many-destinations");
            }
            if fanout > destinations {
                bail!("--fanout (destinations per message) must be at most --destinations");
            }
        } else if destinations == 0 || destinations > 32 {
            bail!("--destinations must be between 1 and 32");
        }
        if self.recipients == 0 || self.recipients > 1000 {
            bail!("--recipients must be between 1 and 1000");
        }
        if fanout == 0 || fanout > 10_000 {
            bail!("--fanout must be between 1 and 10000");
        }
        if self.scenario == Scenario::OneToOne && fanout > 1 {
            bail!("--fanout above 1 needs --scenario fan-out (or backlog)");
        }
        if self.rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
            bail!("--rate must be a positive number of messages per second");
        }
        if self.messages == Some(0) {
            bail!("--messages must be positive");
        }
        if self.repeat == 0 || self.repeat > 100 {
            bail!("--repeat must be between 1 and 100");
        }
        if self.messages.is_none() && self.duration == 0 {
            bail!("--duration must be positive");
        }
        if self.payload > 60 * 1024 {
            bail!("--payload must be at most 61440 bytes (servers refuse 64 KiB contents)");
        }
        Ok(())
    }
}

/// What one run measured on one kind of server.
#[derive(Debug, Clone, Serialize)]
pub struct Measured {
    pub server: &'static str,
    pub scenario: &'static str,
    /// Messages accepted by the origin (a fan-out message counts once).
    pub sent: u64,
    /// Distinct (message, device) deliveries seen by the recipients.
    pub delivered: u64,
    pub duplicates: u64,
    /// Messages the origin never accepted (after retries).
    pub send_failures: u64,
    /// delivered / (first send -> last delivery); backlog: / drain_seconds.
    pub msgs_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// The larger of rss_mib_a and rss_mib_b.
    pub max_rss_mib: f64,
    pub transactions_per_sec: f64,
    pub edus_per_txn: f64,
    pub transactions: u64,
    pub edus: u64,
    /// Bytes through the servers' federation ports (TLS included, both directions).
    pub wire_bytes: u64,
    pub rss_mib_a: f64,
    pub rss_mib_b: f64,
    pub cpu_seconds_a: f64,
    pub cpu_seconds_b: f64,
    /// CPU of the benchmark process itself (clients, relays) over the same phase: it
    /// shares the machine with the servers.
    pub cpu_seconds_bench: f64,
    pub store_bytes_a: u64,
    pub store_bytes_b: u64,
    pub store_bytes_a_start: u64,
    pub store_bytes_b_start: u64,
    /// courier: the store's size after the server stopped and the store was reopened
    /// (write-ahead log replayed and flushed) and compacted, i.e. what is really
    /// left; Synapse: its SQLite files after it stopped.
    pub store_bytes_a_compacted: u64,
    pub store_bytes_b_compacted: u64,
    /// Messages still in A's store after the run (read after stopping it): 0 when
    /// everything was delivered and acknowledged.
    pub pending_rows_a: Option<u64>,
    pub pending_rows_b: Option<u64>,
    /// First send -> last delivery.
    pub elapsed_seconds: f64,
    /// First send -> last accepted send.
    pub send_seconds: f64,
    /// Backlog: destination back up -> last delivery.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain_seconds: Option<f64>,
    /// Backlog: CPU seconds of A, B and the benchmark process from B's restart to the
    /// last delivery (the drain alone, without the queueing phase or B's start-up).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain_cpu_seconds_a: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain_cpu_seconds_b: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain_cpu_seconds_bench: Option<f64>,
    pub fanout: usize,
    pub payload: usize,
    pub concurrency: usize,
    pub destinations: usize,
    /// The paced send rate asked for (`--rate`), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate: Option<f64>,
    /// With `--repeat`: every run's msgs/s, in the order they ran (this report is
    /// the median one's).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub runs_msgs_per_sec: Vec<f64>,
}

impl Measured {
    pub fn expected(&self) -> u64 {
        self.sent * self.fanout as u64
    }

    /// Whether every message arrived exactly once.
    pub fn complete(&self) -> bool {
        self.delivered == self.expected() && self.duplicates == 0
    }
}

/// The whole result: courier, and Synapse when asked for.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    #[serde(flatten)]
    pub courier: Measured,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub synapse: Option<Measured>,
    /// courier msgs/s divided by Synapse msgs/s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub courier_vs_synapse: Option<f64>,
}

/// `courier bench`: runs, prints the table (unless `--json`) and the JSON line; an
/// error if any message was lost or duplicated (after printing the report).
pub fn main(options: Options) -> anyhow::Result<()> {
    options.validate()?;
    options.check_open_files(crate::limits::soft_open_files())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(async {
        tokio::select! {
            r = run(&options) => r,
            s = interrupted() => Err(anyhow!("interrupted by {s}; servers stopped")),
        }
    })?;
    runtime.shutdown_timeout(Duration::from_secs(1));
    if !options.json {
        print!("{}", table(&report));
    }
    println!("{}", serde_json::to_string(&report)?);
    for m in std::iter::once(&report.courier).chain(&report.synapse) {
        if !m.complete() {
            bail!(
                "{}: {} of {} deliveries, {} duplicates",
                m.server,
                m.delivered,
                m.expected(),
                m.duplicates
            );
        }
    }
    Ok(())
}

async fn interrupted() -> &'static str {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "Ctrl-C",
        _ = term => "SIGTERM",
    }
}

/// Runs the benchmark (courier, then Synapse if asked) and returns the report.
pub async fn run(options: &Options) -> anyhow::Result<Report> {
    options.validate()?;
    crate::tls::install_crypto_provider();
    let http = reqwest::Client::builder()
        .tls_danger_accept_invalid_certs(true)
        .no_proxy()
        .pool_max_idle_per_host(1024)
        .http1_only()
        .build()
        .context("building the HTTP client")?;
    let bin = match &options.courier_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe().context("finding the courier executable")?,
    };
    let courier_kind = Kind::Courier(bin);
    let synapse_kind = if options.synapse {
        let (scripts, quiet) = (options.synapse_scripts.clone(), options.json);
        if !quiet {
            eprintln!("installing Synapse (once per machine)...");
        }
        let env =
            tokio::task::spawn_blocking(move || SynapseEnv::install(scripts.as_deref(), None))
                .await??;
        Some(Kind::Synapse(env))
    } else {
        None
    };
    let (mut couriers, mut synapses) = (Vec::new(), Vec::new());
    for i in 0..options.repeat {
        if options.repeat > 1 && !options.json {
            eprintln!("run {} of {}", i + 1, options.repeat);
        }
        couriers.push(measure(&courier_kind, options, &http).await?);
        if let Some(kind) = &synapse_kind {
            synapses.push(measure(kind, options, &http).await?);
        }
    }
    let courier = median_run(couriers).expect("at least one run");
    let synapse = median_run(synapses);
    let courier_vs_synapse = synapse
        .as_ref()
        .filter(|s| s.msgs_per_sec > 0.0)
        .map(|s| round(courier.msgs_per_sec / s.msgs_per_sec, 2));
    Ok(Report {
        courier,
        synapse,
        courier_vs_synapse,
    })
}

/// The run to report of several of one server: the one with the median msgs/s (of an
/// even count, the upper middle one), with every run's msgs/s attached when there
/// were several. A run that lost or duplicated a message is reported instead, so
/// the command fails on it as on a single run. `None` for no runs.
fn median_run(runs: Vec<Measured>) -> Option<Measured> {
    let all: Vec<f64> = runs.iter().map(|m| m.msgs_per_sec).collect();
    let failed = runs.iter().position(|m| !m.complete());
    let pick = failed.unwrap_or_else(|| {
        let mut order: Vec<usize> = (0..runs.len()).collect();
        order.sort_by(|&a, &b| all[a].total_cmp(&all[b]));
        order.get(order.len() / 2).copied().unwrap_or(0)
    });
    let mut m = runs.into_iter().nth(pick)?;
    if all.len() > 1 {
        m.runs_msgs_per_sec = all;
    }
    Some(m)
}

enum Kind {
    Courier(PathBuf),
    Synapse(SynapseEnv),
}

impl Kind {
    fn name(&self) -> &'static str {
        match self {
            Kind::Courier(_) => "courier",
            Kind::Synapse(_) => "Synapse",
        }
    }

    /// Starts one server; `extra` is appended to a courier's configuration.
    async fn start(
        &self,
        scratch: &Scratch,
        label: &str,
        http: &reqwest::Client,
        extra: &str,
    ) -> anyhow::Result<Node> {
        let dir = scratch.path().join(label);
        match self {
            Kind::Courier(bin) => Node::courier(bin, dir, label, http, extra).await,
            Kind::Synapse(env) => Node::synapse(env, dir, label, http).await,
        }
    }
}

/// Federation transactions and EDUs so far: counted by courier's origin, or by the
/// Synapse destinations (see `Node::federation_counts`) or the simulated ones.
async fn federation_counts(rig: &Rig) -> (u64, u64) {
    if rig.a.is_courier() {
        return rig.a.federation_counts().await;
    }
    if let Some(sim) = &rig.sim {
        return sim.federation_counts();
    }
    let mut total = (0, 0);
    for b in &rig.bs {
        let (t, e) = b.federation_counts().await;
        total.0 += t;
        total.1 += e;
    }
    total
}

/// Everything one kind of server needs for a run; dropped in field order: servers
/// first, then their folder.
struct Rig {
    a: Node,
    bs: Vec<Node>,
    /// many-destinations: the simulated destinations (instead of `bs`).
    sim: Option<Destinations>,
    _scratch: Scratch,
}

/// CPU seconds so far of A, of every B together, and of the benchmark process.
fn cpu_now(rig: &Rig) -> [f64; 3] {
    let bench = node::proc_cpu_ticks(std::process::id()).unwrap_or(0) as f64
        / node::clock_ticks_per_second();
    [
        rig.a.cpu_seconds(),
        rig.bs.iter().map(Node::cpu_seconds).sum(),
        bench,
    ]
}

/// One run of the scenario on one kind of server.
async fn measure(kind: &Kind, o: &Options, http: &reqwest::Client) -> anyhow::Result<Measured> {
    let fanout = o.fanout();
    let shared = Arc::new(Shared::default());
    let progress = Progress::start(kind.name(), shared.clone());
    let say = |text: &str| {
        if !o.json {
            progress.note(text);
        }
    };

    progress.set("starting servers", Goal::None);
    let scratch = Scratch::new(kind.name(), o.keep)?;
    let n_dest = o.destinations();
    let listeners = if o.simulated() {
        destinations::bind(n_dest)?
    } else {
        Vec::new()
    };
    // courier maps names to the ports through its configuration; Synapse cannot, so
    // its destinations are named by their addresses.
    let by_address = matches!(kind, Kind::Synapse(_));
    let sim_names = destinations::names(&listeners, by_address)?;
    let a = kind
        .start(&scratch, "A", http, &destinations::overrides(&listeners)?)
        .await?;
    let mut bs = Vec::new();
    for j in 0..if o.simulated() { 0 } else { n_dest } {
        let label = if n_dest == 1 {
            "B".to_owned()
        } else {
            format!("B{}", j + 1)
        };
        bs.push(kind.start(&scratch, &label, http, "").await?);
    }
    let sim = if o.simulated() {
        Some(
            Destinations::serve(
                listeners,
                sim_names,
                &a.server_name,
                &a.base,
                http,
                shared.clone(),
            )
            .await?,
        )
    } else {
        None
    };
    let mut rig = Rig {
        a,
        bs,
        sim,
        _scratch: scratch,
    };
    let b_names = match &rig.sim {
        Some(sim) => format!(
            "{} simulated ({} .. {})",
            sim.names.len(),
            sim.names.first().map_or("", String::as_str),
            sim.names.last().map_or("", String::as_str)
        ),
        None => rig
            .bs
            .iter()
            .map(|b| b.server_name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
    };
    say(&format!(
        "{}: A = {}, B = {b_names}",
        kind.name(),
        rig.a.server_name,
    ));

    // Devices: senders on A, recipients on each B.
    progress.set("creating devices", Goal::None);
    let sender_ids: Vec<String> = (0..o.concurrency.min(MAX_SENDER_DEVICES))
        .map(|i| format!("S{i}"))
        .collect();
    let senders = rig.a.devices("sender", &sender_ids).await?;
    let per_dest = if fanout > 1 { fanout } else { o.recipients };
    let recipient_ids: Vec<String> = (0..per_dest).map(|k| format!("R{k}")).collect();
    let mut targets = Vec::new();
    let mut receivers: Vec<(Device, Option<String>)> = Vec::new();
    for b in &mut rig.bs {
        let devices = b.devices("rcpt", &recipient_ids).await?;
        targets.push(Target {
            user_id: format!("@rcpt:{}", b.server_name),
            device_ids: recipient_ids.clone(),
        });
        receivers.extend(devices.into_iter().map(|d| (d, None)));
    }
    if let Some(sim) = &rig.sim {
        // No devices behind simulated servers: each message names device R0.
        targets.extend(sim.names.iter().map(|name| Target {
            user_id: format!("@rcpt:{name}"),
            device_ids: vec!["R0".to_owned()],
        }));
    }

    // Initial syncs (tokens to go on from), then one message per destination to
    // exchange keys before anything is measured.
    progress.set("warming up", Goal::None);
    for (dev, since) in &mut receivers {
        *since = Some(
            driver::sync_once(&mut Conn::for_device(dev).map_err(|e| anyhow!(e))?, None, 0)
                .await
                .map_err(|e| anyhow!("first sync of {} failed: {e}", dev.device_id))?
                .next_batch,
        );
    }
    let mut sender_conn = Conn::for_device(&senders[0]).map_err(|e| anyhow!(e))?;
    let mut sender_since = Some(
        driver::sync_once(&mut sender_conn, None, 0)
            .await
            .map_err(|e| anyhow!("first sync of the sender failed: {e}"))?
            .next_batch,
    );
    if let Some(sim) = &rig.sim {
        // One request to every simulated destination: opens A's connections.
        let ok = driver::send_to_all(
            &mut sender_conn,
            driver::WARMUP_TYPE,
            "w",
            &targets,
            &shared,
        )
        .await;
        if !ok {
            return Err(warmup_refused(kind, &shared));
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        while sim.warmups() < targets.len() as u64 {
            if Instant::now() > deadline {
                bail!(
                    "{}: warm-up reached {} of {} destinations in 120 s; last error: {:?}",
                    kind.name(),
                    sim.warmups(),
                    targets.len(),
                    shared.last_error.lock().map(|e| e.clone())
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    for (j, target) in targets.iter().enumerate().take(rig.bs.len()) {
        let ok = driver::send_one(
            &mut sender_conn,
            driver::WARMUP_TYPE,
            &format!("w{j}"),
            &target.user_id,
            &target.device_ids[0],
            &shared,
        )
        .await;
        if !ok {
            return Err(warmup_refused(kind, &shared));
        }
        let (dev, since) = &mut receivers[j * per_dest];
        *since = driver::sync_until_type(
            dev,
            since.take(),
            driver::WARMUP_TYPE,
            Duration::from_secs(120),
        )
        .await
        .map_err(|e| anyhow!("{}: warm-up failed: {e}", kind.name()))?;
    }

    // The measured phase, once the warm-up's own bookkeeping (the origin counts a
    // transaction when the 200 is back, after the recipient could see it) settled.
    tokio::time::sleep(Duration::from_millis(300)).await;
    rig.a.begin_accounting();
    for b in &mut rig.bs {
        b.begin_accounting();
    }
    let bench_cpu_start = cpu_now(&rig)[2];
    let store_a_start = rig.a.store_bytes();
    let store_b_start: u64 = rig.bs.iter().map(Node::store_bytes).sum();
    let fed_start = federation_counts(&rig).await;
    let wire = |rig: &Rig| {
        rig.a.wire_bytes()
            + rig.bs.iter().map(Node::wire_bytes).sum::<u64>()
            + rig.sim.as_ref().map_or(0, Destinations::body_bytes)
    };
    let wire_start = wire(&rig);

    let deadline = o
        .messages
        .is_none()
        .then(|| Instant::now() + Duration::from_secs(o.duration));
    let plan = Arc::new(SendPlan {
        limit: o.messages.unwrap_or(u64::MAX),
        deadline,
        pace: o.rate.map(|r| (Instant::now(), r)),
        payload: o.payload,
        fanout: if o.simulated() { 1 } else { fanout },
        spread: if o.simulated() { fanout } else { 1 },
        targets,
    });
    let send_goal = match (o.messages, deadline) {
        (Some(n), _) => Goal::Sent(n),
        (None, Some(d)) => Goal::Until(d, Duration::from_secs(o.duration)),
        _ => Goal::None,
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let spawn_receivers = |receivers: &[(Device, Option<String>)]| {
        receivers
            .iter()
            .map(|(dev, since)| {
                tokio::spawn(driver::receive_loop(
                    dev.clone(),
                    since.clone(),
                    shared.clone(),
                    stop_rx.clone(),
                ))
            })
            .collect::<Vec<_>>()
    };
    let run_senders = || async {
        // Returns when every sender is done; the time of the last accepted send is in
        // `shared.last_send_us`.
        let tasks: Vec<_> = (0..o.concurrency)
            .map(|i| {
                tokio::spawn(driver::send_loop(
                    senders[i % senders.len()].clone(),
                    plan.clone(),
                    shared.clone(),
                ))
            })
            .collect();
        for t in tasks {
            let _ = t.await;
        }
    };

    let mut back_up_us = None;
    let mut drain_cpu_start = None;
    let receiver_tasks = if o.scenario == Scenario::Backlog {
        progress.set("stopping B", Goal::None);
        for b in &mut rig.bs {
            b.stop().await;
        }
        progress.set("queueing on A (B is down)", send_goal);
        run_senders().await;
        say(&format!(
            "{}: {} messages queued on A; restarting B",
            kind.name(),
            shared.sent.load(Ordering::Relaxed)
        ));
        progress.set("restarting B", Goal::None);
        for b in &mut rig.bs {
            b.restart().await?;
        }
        back_up_us = Some(shared.since_epoch_us());
        drain_cpu_start = Some(cpu_now(&rig));
        // Any request from B tells A it is back (A resets its backoff): as in real
        // life, the restarted server talks first.
        for (j, _) in rig.bs.iter().enumerate() {
            let (dev, _) = &receivers[j * per_dest];
            let Ok(mut conn) = Conn::for_device(dev) else {
                continue;
            };
            let _ = driver::send_one(
                &mut conn,
                driver::POKE_TYPE,
                "poke",
                &senders[0].user_id,
                &senders[0].device_id,
                &shared,
            )
            .await;
        }
        spawn_receivers(&receivers)
    } else {
        let tasks = spawn_receivers(&receivers);
        progress.set("sending", send_goal);
        run_senders().await;
        tasks
    };

    let sent = shared.sent.load(Ordering::Relaxed);
    let expected = sent * fanout as u64;
    progress.set("delivering", Goal::Delivered(expected));
    let complete = wait_delivered(&shared, expected).await;
    let drain_cpu = drain_cpu_start.map(|start| {
        let end = cpu_now(&rig);
        [0, 1, 2].map(|i| round(end[i] - start[i], 2))
    });
    if !complete {
        say(&format!(
            "{}: delivery stalled for {STALL_TIMEOUT:?} at {} of {expected}; last error: {:?}",
            kind.name(),
            shared.delivered.load(Ordering::Relaxed),
            shared.last_error.lock().map(|e| e.clone()).unwrap_or(None)
        ));
    }
    let _ = stop_tx.send(true);
    let mut latency = rig
        .sim
        .as_ref()
        .map(Destinations::latency)
        .unwrap_or_default();
    for t in receiver_tasks {
        let r: Received = t.await.unwrap_or_default();
        latency.merge(&r.latency_us);
    }
    if o.scenario == Scenario::Backlog {
        // Acknowledge the pokes on A, so its store can empty too.
        for _ in 0..2 {
            if let Ok(p) = driver::sync_once(&mut sender_conn, sender_since.as_deref(), 0).await {
                sender_since = Some(p.next_batch);
            }
        }
    }

    // Let the last acknowledgements land, then read the counters.
    progress.set("measuring", Goal::None);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let fed_end = federation_counts(&rig).await;
    let wire_bytes = wire(&rig).saturating_sub(wire_start);
    let first_us = shared.first_send_us.load(Ordering::Relaxed);
    let last_us = shared.last_delivery_us.load(Ordering::Relaxed);
    let elapsed = last_us.saturating_sub(first_us) as f64 / 1e6;
    let drain = back_up_us.map(|b| last_us.saturating_sub(b) as f64 / 1e6);
    let rate_window = drain.unwrap_or(elapsed);
    let delivered = shared.delivered.load(Ordering::Relaxed);
    let per_sec = |n: u64| {
        if rate_window > 0.0 {
            n as f64 / rate_window
        } else {
            0.0
        }
    };
    let transactions = fed_end.0.saturating_sub(fed_start.0);
    let edus = fed_end.1.saturating_sub(fed_start.1);
    let cpu = cpu_now(&rig);
    let rss_a = rig.a.peak_rss_mib();
    let rss_b = rig
        .bs
        .iter_mut()
        .map(Node::peak_rss_mib)
        .fold(0.0, f64::max);
    let measured = Measured {
        server: kind.name(),
        scenario: o.scenario.name(),
        sent,
        delivered,
        duplicates: shared.duplicates.load(Ordering::Relaxed),
        send_failures: shared.send_failures.load(Ordering::Relaxed),
        msgs_per_sec: round(per_sec(delivered), 1),
        p50_ms: round(latency.quantile(0.50) as f64 / 1000.0, 3),
        p99_ms: round(latency.quantile(0.99) as f64 / 1000.0, 3),
        max_ms: round(latency.max() as f64 / 1000.0, 3),
        max_rss_mib: round(rss_a.max(rss_b), 1),
        transactions_per_sec: round(per_sec(transactions), 1),
        edus_per_txn: if transactions > 0 {
            round(edus as f64 / transactions as f64, 2)
        } else {
            0.0
        },
        transactions,
        edus,
        wire_bytes,
        rss_mib_a: round(rss_a, 1),
        rss_mib_b: round(rss_b, 1),
        cpu_seconds_a: round(cpu[0], 2),
        cpu_seconds_b: round(cpu[1], 2),
        cpu_seconds_bench: round(cpu[2] - bench_cpu_start, 2),
        store_bytes_a: rig.a.store_bytes(),
        store_bytes_b: rig.bs.iter().map(Node::store_bytes).sum(),
        store_bytes_a_start: store_a_start,
        store_bytes_b_start: store_b_start,
        store_bytes_a_compacted: 0,
        store_bytes_b_compacted: 0,
        pending_rows_a: None,
        pending_rows_b: None,
        elapsed_seconds: round(elapsed, 3),
        send_seconds: round(
            shared
                .last_send_us
                .load(Ordering::Relaxed)
                .saturating_sub(first_us) as f64
                / 1e6,
            3,
        ),
        drain_seconds: drain.map(|d| round(d, 3)),
        drain_cpu_seconds_a: drain_cpu.map(|c| c[0]),
        drain_cpu_seconds_b: drain_cpu.map(|c| c[1]),
        drain_cpu_seconds_bench: drain_cpu.map(|c| c[2]),
        fanout,
        payload: o.payload,
        concurrency: o.concurrency,
        destinations: n_dest,
        rate: o.rate,
        runs_msgs_per_sec: Vec::new(),
    };
    let mut measured = measured;
    progress.set("stopping servers, reading their stores", Goal::None);
    measured.pending_rows_a = rig.a.stop_and_count_pending().await;
    let mut pending_b = Some(0);
    for b in &mut rig.bs {
        pending_b = match (pending_b, b.stop_and_count_pending().await) {
            (Some(x), Some(y)) => Some(x + y),
            _ => None,
        };
    }
    measured.pending_rows_b = if rig.sim.is_some() { None } else { pending_b };
    measured.store_bytes_a_compacted = rig.a.store_bytes();
    measured.store_bytes_b_compacted = rig.bs.iter().map(Node::store_bytes).sum();
    if measured.pending_rows_a.unwrap_or(0) + measured.pending_rows_b.unwrap_or(0) > 0 {
        say(&format!(
            "{}: stores still hold messages after the run (A {:?}, B {:?}); last client error: {:?}",
            kind.name(),
            measured.pending_rows_a,
            measured.pending_rows_b,
            shared.last_error.lock().map(|e| e.clone()).unwrap_or(None)
        ));
    }
    drop(rig);
    progress.finish();
    Ok(measured)
}

/// Waits until `expected` deliveries were seen, or none came for `STALL_TIMEOUT`.
/// The error for a warm-up message the origin refused.
fn warmup_refused(kind: &Kind, shared: &Shared) -> anyhow::Error {
    anyhow!(
        "{}: warm-up message refused: {:?}",
        kind.name(),
        shared.last_error.lock().map(|e| e.clone())
    )
}

async fn wait_delivered(shared: &Shared, expected: u64) -> bool {
    let mut last = (Instant::now(), shared.delivered.load(Ordering::Relaxed));
    loop {
        let now_delivered = shared.delivered.load(Ordering::Relaxed);
        if now_delivered >= expected {
            return true;
        }
        if now_delivered != last.1 {
            last = (Instant::now(), now_delivered);
        } else if last.0.elapsed() > STALL_TIMEOUT {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn round(v: f64, digits: i32) -> f64 {
    if !v.is_finite() {
        return 0.0;
    }
    let f = 10f64.powi(digits);
    (v * f).round() / f
}

/// How one table row renders one server's figures.
type Cell = Box<dyn Fn(&Measured) -> String>;

/// The human-readable table (one column per server).
pub fn table(r: &Report) -> String {
    let c = &r.courier;
    let cols: Vec<&Measured> = std::iter::once(c).chain(&r.synapse).collect();
    let rows: Vec<(&str, Cell)> = vec![
        ("sent", Box::new(|m| m.sent.to_string())),
        ("delivered", Box::new(|m| m.delivered.to_string())),
        ("duplicates", Box::new(|m| m.duplicates.to_string())),
        ("msgs/s", Box::new(|m| format!("{:.1}", m.msgs_per_sec))),
        ("latency p50 ms", Box::new(|m| format!("{:.1}", m.p50_ms))),
        ("latency p99 ms", Box::new(|m| format!("{:.1}", m.p99_ms))),
        ("latency max ms", Box::new(|m| format!("{:.1}", m.max_ms))),
        (
            "elapsed s",
            Box::new(|m| format!("{:.2}", m.elapsed_seconds)),
        ),
        (
            "drain s",
            Box::new(|m| m.drain_seconds.map_or("-".into(), |d| format!("{d:.2}"))),
        ),
        (
            "transactions/s",
            Box::new(|m| format!("{:.1}", m.transactions_per_sec)),
        ),
        (
            "EDUs/transaction",
            Box::new(|m| format!("{:.2}", m.edus_per_txn)),
        ),
        ("federation wire MiB", Box::new(|m| mib(m.wire_bytes))),
        (
            "peak RSS A MiB",
            Box::new(|m| format!("{:.1}", m.rss_mib_a)),
        ),
        (
            "peak RSS B MiB",
            Box::new(|m| format!("{:.1}", m.rss_mib_b)),
        ),
        ("CPU s A", Box::new(|m| format!("{:.2}", m.cpu_seconds_a))),
        ("CPU s B", Box::new(|m| format!("{:.2}", m.cpu_seconds_b))),
        (
            "CPU s bench clients",
            Box::new(|m| format!("{:.2}", m.cpu_seconds_bench)),
        ),
        (
            "store A MiB (start)",
            Box::new(|m| format!("{} ({})", mib(m.store_bytes_a), mib(m.store_bytes_a_start))),
        ),
        (
            "store B MiB (start)",
            Box::new(|m| format!("{} ({})", mib(m.store_bytes_b), mib(m.store_bytes_b_start))),
        ),
        (
            "compacted A/B MiB",
            Box::new(|m| {
                format!(
                    "{}/{}",
                    mib(m.store_bytes_a_compacted),
                    mib(m.store_bytes_b_compacted)
                )
            }),
        ),
        (
            "left in stores A/B",
            Box::new(|m| format!("{}/{}", opt(m.pending_rows_a), opt(m.pending_rows_b))),
        ),
    ];
    let per_message = if c.scenario == Scenario::ManyDestinations.name() {
        "destination(s)"
    } else {
        "device(s)"
    };
    let mut out = format!(
        "scenario {}: {} payload bytes, {} {per_message} per message, {} in flight{}, {} destination(s)\n",
        c.scenario,
        c.payload,
        c.fanout,
        c.concurrency,
        c.rate
            .map_or(String::new(), |r| format!(" (paced at {r} msgs/s)")),
        c.destinations
    );
    out.push_str(&format!("{:<22}", ""));
    for m in &cols {
        out.push_str(&format!("{:>18}", m.server));
    }
    out.push('\n');
    for (name, f) in &rows {
        out.push_str(&format!("{name:<22}"));
        for m in &cols {
            out.push_str(&format!("{:>18}", f(m)));
        }
        out.push('\n');
    }
    if let Some(x) = r.courier_vs_synapse {
        out.push_str(&format!("courier/Synapse = {x:.2} (msgs/s)\n"));
    }
    for m in cols.iter().filter(|m| !m.runs_msgs_per_sec.is_empty()) {
        // Sorted, so the reported (median) run's figure is the middle one.
        let mut each = m.runs_msgs_per_sec.clone();
        each.sort_by(f64::total_cmp);
        let each: Vec<String> = each.iter().map(|r| format!("{r:.1}")).collect();
        out.push_str(&format!(
            "{} msgs/s of each run, sorted: {}\n",
            m.server,
            each.join(" / ")
        ));
    }
    out
}

fn opt(v: Option<u64>) -> String {
    v.map_or("?".into(), |v| v.to_string())
}

fn mib(bytes: u64) -> String {
    format!("{:.2}", bytes as f64 / (1024.0 * 1024.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn a_run_the_open_file_limit_cannot_carry_is_refused_at_once() {
        let many = Options::try_parse_from(["bench", "--scenario", "many-destinations"]).unwrap();
        let err = many.check_open_files(Some(1024)).unwrap_err().to_string();
        assert!(
            err.contains("2288 open files") && err.contains("ulimit -n"),
            "{err}"
        );
        assert!(many.check_open_files(Some(4096)).is_ok());
        assert!(many.check_open_files(None).is_ok(), "unknown: try");
        let one = Options::try_parse_from(["bench"]).unwrap();
        assert!(
            one.check_open_files(Some(1024)).is_ok(),
            "32 in flight fit in 1024"
        );
        // 2000 devices, each syncing on a connection of its own.
        let wide = Options::try_parse_from(["bench", "--scenario", "fan-out", "--fanout", "2000"])
            .unwrap();
        let err = wide.check_open_files(Some(1024)).unwrap_err().to_string();
        assert!(err.contains("2288 open files"), "{err}");
    }

    #[test]
    fn options_defaults_and_checks() {
        let o = Options::try_parse_from(["bench"]).unwrap();
        assert_eq!(o.scenario, Scenario::OneToOne);
        assert_eq!(o.fanout(), 1);
        assert!(o.validate().is_ok());
        let o = Options::try_parse_from(["bench", "--scenario", "fan-out"]).unwrap();
        assert_eq!(o.fanout(), 100);
        let o = Options::try_parse_from(["bench", "--fanout", "3"]).unwrap();
        assert!(o.validate().is_err());
        let o =
            Options::try_parse_from(["bench", "--scenario", "backlog", "--messages", "0"]).unwrap();
        assert!(o.validate().is_err());
        assert!(Options::try_parse_from(["bench", "--scenario", "sideways"]).is_err());
    }

    /// A run's report with made-up figures.
    fn sample() -> Measured {
        Measured {
            server: "courier",
            scenario: "one-to-one",
            sent: 10,
            delivered: 10,
            duplicates: 0,
            send_failures: 0,
            msgs_per_sec: 100.0,
            p50_ms: 1.0,
            p99_ms: 2.0,
            max_ms: 3.0,
            max_rss_mib: 40.0,
            transactions_per_sec: 5.0,
            edus_per_txn: 2.0,
            transactions: 5,
            edus: 10,
            wire_bytes: 1000,
            rss_mib_a: 40.0,
            rss_mib_b: 30.0,
            cpu_seconds_a: 0.1,
            cpu_seconds_b: 0.1,
            cpu_seconds_bench: 0.1,
            store_bytes_a: 1,
            store_bytes_b: 2,
            store_bytes_a_start: 1,
            store_bytes_b_start: 2,
            store_bytes_a_compacted: 1,
            store_bytes_b_compacted: 2,
            pending_rows_a: Some(0),
            pending_rows_b: Some(0),
            elapsed_seconds: 0.1,
            send_seconds: 0.1,
            drain_seconds: None,
            drain_cpu_seconds_a: None,
            drain_cpu_seconds_b: None,
            drain_cpu_seconds_bench: None,
            fanout: 1,
            payload: 256,
            concurrency: 8,
            destinations: 1,
            rate: None,
            runs_msgs_per_sec: Vec::new(),
        }
    }

    #[test]
    fn json_has_the_fixed_names_and_table_the_ratio() {
        let m = sample();
        let mut s = m.clone();
        s.server = "Synapse";
        s.msgs_per_sec = 50.0;
        let r = Report {
            courier: m,
            synapse: Some(s),
            courier_vs_synapse: Some(2.0),
        };
        let v: serde_json::Value = serde_json::to_value(&r).unwrap();
        for f in [
            "sent",
            "delivered",
            "duplicates",
            "msgs_per_sec",
            "p50_ms",
            "p99_ms",
            "max_rss_mib",
            "max_ms",
            "transactions_per_sec",
            "edus_per_txn",
            "wire_bytes",
            "rss_mib_a",
            "rss_mib_b",
            "cpu_seconds_a",
            "cpu_seconds_b",
            "store_bytes_a",
            "store_bytes_b",
            "scenario",
        ] {
            assert!(v.get(f).is_some(), "{f}");
            assert!(v["synapse"].get(f).is_some(), "synapse.{f}");
        }
        assert!(table(&r).contains("courier/Synapse = 2.00"));
        assert!(
            v.get("runs_msgs_per_sec").is_none(),
            "one run lists no runs"
        );
    }

    fn runs(rates: &[f64]) -> Vec<Measured> {
        rates
            .iter()
            .map(|&r| Measured {
                msgs_per_sec: r,
                ..sample()
            })
            .collect()
    }

    #[test]
    fn repeated_runs_report_the_median_one_and_list_them_all() {
        let m = median_run(runs(&[30.0, 10.0, 20.0])).unwrap();
        assert_eq!(m.msgs_per_sec, 20.0);
        assert_eq!(m.runs_msgs_per_sec, vec![30.0, 10.0, 20.0]);
        // Of an even count, the upper middle run.
        let m = median_run(runs(&[40.0, 10.0, 30.0, 20.0])).unwrap();
        assert_eq!(m.msgs_per_sec, 30.0);
        // One run: reported as it is, no list.
        let m = median_run(runs(&[7.0])).unwrap();
        assert_eq!(m.msgs_per_sec, 7.0);
        assert!(m.runs_msgs_per_sec.is_empty());
        assert!(median_run(Vec::new()).is_none());
        let r = Report {
            courier: median_run(runs(&[30.0, 10.0, 20.0])).unwrap(),
            synapse: None,
            courier_vs_synapse: None,
        };
        assert!(
            table(&r).contains("courier msgs/s of each run, sorted: 10.0 / 20.0 / 30.0"),
            "{}",
            table(&r)
        );
    }

    #[test]
    fn a_run_that_lost_a_message_is_reported_instead_of_the_median() {
        let mut all = runs(&[30.0, 10.0, 20.0]);
        all[0].delivered -= 1;
        let m = median_run(all).unwrap();
        assert_eq!(m.msgs_per_sec, 30.0);
        assert_ne!(m.delivered, m.expected());
        let mut all = runs(&[30.0, 10.0, 20.0]);
        all[1].duplicates = 1;
        assert_eq!(median_run(all).unwrap().duplicates, 1);
    }

    #[test]
    fn repeat_is_bounded() {
        for bad in ["0", "101"] {
            let o = Options::try_parse_from(["bench", "--repeat", bad]).unwrap();
            assert!(o.validate().is_err(), "--repeat {bad}");
        }
        let o = Options::try_parse_from(["bench", "--repeat", "5"]).unwrap();
        assert!(o.validate().is_ok());
    }
}
