//! The homeservers a benchmark drives: two (or more) couriers started as child
//! processes of a courier binary, or real Synapse homeservers started through the
//! scripts in `shared/peers/synapse/`, each in a scratch folder of its own, each
//! behind a byte-counting TCP relay on the port its server name names (so federation
//! traffic, and only that, is measured on the wire).
//!
//! Owns: scratch folders, free ports, process start/stop/restart, readiness probes,
//! device creation (courier admin API, Synapse register/login), per-process peak RSS
//! and CPU time (from `/proc`), store size, and the federation counters (courier's
//! `/metrics`, Synapse's log).
//!
//! It must never leave a process or a folder behind on a normal return, an error or
//! Ctrl-C (everything is killed and removed on drop), never touch a folder it did not
//! create, and never send traffic anywhere but 127.0.0.1.

use std::collections::HashSet;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// The admin token every benchmark courier gets.
pub const ADMIN_TOKEN: &str = "courier-bench-admin-token-0123456789";
/// How long a server may take to answer after it was started.
const START_TIMEOUT: Duration = Duration::from_secs(90);

/// A folder under the system temp folder, removed (with everything in it) on drop,
/// unless it is to be kept (`--keep`: its servers' configuration, data and logs stay
/// for whoever wants to read them).
pub struct Scratch {
    path: PathBuf,
    keep: bool,
}

impl Scratch {
    pub fn new(tag: &str, keep: bool) -> anyhow::Result<Scratch> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "courier-bench-{tag}-{}-{nanos:08x}",
            std::process::id()
        ));
        std::fs::create_dir_all(&path)
            .with_context(|| format!("creating scratch folder {}", path.display()))?;
        Ok(Scratch { path, keep })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("kept: {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> anyhow::Result<u16> {
    let l = StdTcpListener::bind("127.0.0.1:0").context("binding a free loopback port")?;
    Ok(l.local_addr()?.port())
}

/// A TCP relay on a port of its own to a server's real listener, counting every byte
/// in both directions. Federation peers reach the server through it (its port is the
/// one in the server name); clients go to the listener directly.
pub struct WireCounter {
    pub port: u16,
    bytes: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl WireCounter {
    pub async fn start(upstream_port: u16) -> anyhow::Result<WireCounter> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the federation relay")?;
        let port = listener.local_addr()?.port();
        let bytes = Arc::new(AtomicU64::new(0));
        let upstream = SocketAddr::from(([127, 0, 0, 1], upstream_port));
        let task = tokio::spawn(relay(listener, upstream, bytes.clone()));
        Ok(WireCounter { port, bytes, task })
    }

    /// Bytes relayed so far, both directions.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

impl Drop for WireCounter {
    fn drop(&mut self) {
        // The connection tasks live in the accept task's JoinSet: they go with it.
        self.task.abort();
    }
}

async fn relay(listener: TcpListener, upstream: SocketAddr, bytes: Arc<AtomicU64>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((inbound, _)) => {
                    conns.spawn(pipe(inbound, upstream, bytes.clone()));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn pipe(inbound: TcpStream, upstream: SocketAddr, bytes: Arc<AtomicU64>) {
    // The server being down is what a peer must see: the connection just closes.
    let Ok(outbound) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let (ri, wi) = inbound.into_split();
    let (ro, wo) = outbound.into_split();
    tokio::join!(copy_counting(ri, wo, &bytes), copy_counting(ro, wi, &bytes));
}

async fn copy_counting(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    bytes: &AtomicU64,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                bytes.fetch_add(n as u64, Ordering::Relaxed);
                if to.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown().await;
}

/// Where Synapse comes from: the peer scripts and the venv `install.sh` made.
#[derive(Debug, Clone)]
pub struct SynapseEnv {
    pub scripts: PathBuf,
    pub venv: PathBuf,
}

impl SynapseEnv {
    /// Finds the scripts and installs Synapse into `root` (idempotent; serialized with
    /// a lock file, as the tests do).
    pub fn install(scripts: Option<&Path>, root: Option<&Path>) -> anyhow::Result<SynapseEnv> {
        let scripts = match scripts {
            Some(s) => s.to_owned(),
            None => find_synapse_scripts().context(
                "cannot find shared/peers/synapse/ (give --synapse-scripts or \
                 COURIER_SYNAPSE_SCRIPTS)",
            )?,
        };
        let root = match root {
            Some(r) => r.to_owned(),
            None => std::env::var_os("COURIER_SYNAPSE_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into()))
                        .join(".cache/courier-synapse")
                }),
        };
        std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        let out = Command::new("flock")
            .arg(root.join(".install.lock"))
            .arg("bash")
            .arg(scripts.join("install.sh"))
            .arg(&root)
            .stdin(Stdio::null())
            .output()
            .context("running install.sh (needs flock and bash)")?;
        if !out.status.success() {
            bail!(
                "install.sh failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(SynapseEnv {
            scripts,
            venv: root.join("venv"),
        })
    }

    fn script(&self, name: &str) -> Command {
        let mut c = Command::new("bash");
        c.arg(self.scripts.join(name))
            .env("SYNAPSE_VENV", &self.venv)
            .stdin(Stdio::null());
        c
    }
}

fn find_synapse_scripts() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("COURIER_SYNAPSE_SCRIPTS") {
        return Some(PathBuf::from(p));
    }
    let candidates = [
        PathBuf::from("../shared/peers/synapse"),
        PathBuf::from("shared/peers/synapse"),
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/peers/synapse"),
    ];
    candidates
        .into_iter()
        .find(|p| p.join("start.sh").is_file())
}

/// One device a benchmark client uses.
#[derive(Debug, Clone)]
pub struct Device {
    /// The client API base URL of its homeserver.
    pub base: String,
    pub user_id: String,
    pub device_id: String,
    pub token: String,
}

enum Flavor {
    Courier { bin: PathBuf, child: Option<Child> },
    Synapse { env: SynapseEnv, running: bool },
}

/// One running homeserver.
pub struct Node {
    /// `A`, `B`, `B2`, ... for messages.
    pub label: String,
    flavor: Flavor,
    dir: PathBuf,
    /// The real listener (client API; federation arrives through `wire`).
    port: u16,
    wire: WireCounter,
    pub server_name: String,
    /// Client API base URL.
    pub base: String,
    http: reqwest::Client,
    /// Synapse users already registered.
    registered: HashSet<String>,
    // Accounting over the measured phase, across restarts.
    cpu_base_ticks: u64,
    cpu_accum_ticks: u64,
    hwm_kib: u64,
}

impl Node {
    /// Starts a courier from `bin` in `dir` (created fresh): the default configuration,
    /// plus what loopback federation needs and an admin token, then `extra` (TOML
    /// tables appended as they are, e.g. `[federation.overrides]`).
    pub async fn courier(
        bin: &Path,
        dir: PathBuf,
        label: &str,
        http: &reqwest::Client,
        extra: &str,
    ) -> anyhow::Result<Node> {
        std::fs::create_dir_all(&dir)?;
        let port = free_port()?;
        let wire = WireCounter::start(port).await?;
        let server_name = format!("127.0.0.1:{}", wire.port);
        let config = format!(
            "# Written by `courier bench`.\n\
             server_name = \"{server_name}\"\n\
             data_dir = \"data\"\n\
             signing_key = \"keys/signing.key\"\n\n\
             [[listeners]]\n\
             address = \"127.0.0.1:{port}\"\n\
             resources = [\"federation\", \"client\", \"admin\"]\n\n\
             [federation]\n\
             allow_private_destinations = true\n\
             verify_certificates = false\n\n\
             [admin]\n\
             token = \"{ADMIN_TOKEN}\"\n\
             {extra}"
        );
        std::fs::write(dir.join("courier.toml"), config)?;
        let flavor = Flavor::Courier {
            bin: bin.to_owned(),
            child: None,
        };
        Node::launched(label, flavor, dir, port, wire, server_name, http).await
    }

    /// Starts a Synapse in `dir` (created fresh by `start.sh`).
    pub async fn synapse(
        env: &SynapseEnv,
        dir: PathBuf,
        label: &str,
        http: &reqwest::Client,
    ) -> anyhow::Result<Node> {
        let port = free_port()?;
        let wire = WireCounter::start(port).await?;
        let server_name = format!("127.0.0.1:{}", wire.port);
        let flavor = Flavor::Synapse {
            env: env.clone(),
            running: false,
        };
        Node::launched(label, flavor, dir, port, wire, server_name, http).await
    }

    /// A node of either flavor, started and serving.
    async fn launched(
        label: &str,
        flavor: Flavor,
        dir: PathBuf,
        port: u16,
        wire: WireCounter,
        server_name: String,
        http: &reqwest::Client,
    ) -> anyhow::Result<Node> {
        let mut node = Node {
            label: label.to_owned(),
            flavor,
            dir,
            port,
            wire,
            server_name,
            base: format!("https://127.0.0.1:{port}"),
            http: http.clone(),
            registered: HashSet::new(),
            cpu_base_ticks: 0,
            cpu_accum_ticks: 0,
            hwm_kib: 0,
        };
        node.launch().await?;
        Ok(node)
    }

    pub fn is_courier(&self) -> bool {
        matches!(self.flavor, Flavor::Courier { .. })
    }

    /// Starts the process (again, on the same folder) and waits until it serves.
    async fn launch(&mut self) -> anyhow::Result<()> {
        match &mut self.flavor {
            Flavor::Courier { bin, child } => {
                let log = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.dir.join("courier.log"))?;
                let mut cmd = Command::new(&*bin);
                cmd.arg("serve")
                    .arg("--config")
                    .arg(self.dir.join("courier.toml"))
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(log);
                // Own process group: a Ctrl-C in the terminal reaches the benchmark,
                // which then stops its children itself.
                std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
                *child = Some(
                    cmd.spawn()
                        .with_context(|| format!("starting {}", bin.display()))?,
                );
            }
            Flavor::Synapse { env, running } => {
                let mut cmd = env.script("start.sh");
                cmd.arg(&self.dir)
                    .arg(&self.server_name)
                    .arg(self.port.to_string());
                let out = tokio::task::spawn_blocking(move || cmd.output())
                    .await?
                    .context("running start.sh")?;
                *running = true;
                if !out.status.success() {
                    bail!(
                        "Synapse {} did not start: {}{}",
                        self.label,
                        String::from_utf8_lossy(&out.stdout).trim(),
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                }
            }
        }
        self.wait_ready().await
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        let url = format!("{}/_matrix/federation/v1/version", self.base);
        loop {
            if let Flavor::Courier {
                child: Some(child), ..
            } = &mut self.flavor
                && let Ok(Some(status)) = child.try_wait()
            {
                bail!(
                    "courier {} exited during start-up ({status}); log tail:\n{}",
                    self.label,
                    self.log_tail()
                );
            }
            if let Ok(r) = self
                .http
                .get(&url)
                .timeout(Duration::from_secs(5))
                .send()
                .await
                && r.status().is_success()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not answer on {url} within {START_TIMEOUT:?}; log tail:\n{}",
                    self.label,
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log_path(&self) -> PathBuf {
        match self.flavor {
            Flavor::Courier { .. } => self.dir.join("courier.log"),
            Flavor::Synapse { .. } => self.dir.join("homeserver.log"),
        }
    }

    /// The last lines of the server's log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// The server's process ID while it runs.
    pub fn pid(&self) -> Option<u32> {
        match &self.flavor {
            Flavor::Courier { child, .. } => child.as_ref().map(Child::id),
            Flavor::Synapse { running, .. } => {
                if !running {
                    return None;
                }
                std::fs::read_to_string(self.dir.join("homeserver.pid"))
                    .ok()?
                    .trim()
                    .parse()
                    .ok()
            }
        }
    }

    /// Stops the server (SIGKILL for courier: no goodbye; `stop.sh` for Synapse),
    /// keeping its folder; its CPU time and peak RSS so far stay counted.
    pub async fn stop(&mut self) {
        self.account_before_stop();
        self.stop_process().await;
    }

    /// Starts the server again on the same folder, and keeps accounting.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.launch().await?;
        self.cpu_base_ticks = self.pid().and_then(proc_cpu_ticks).unwrap_or(0);
        Ok(())
    }

    async fn stop_process(&mut self) {
        match &mut self.flavor {
            Flavor::Courier { child, .. } => {
                if let Some(mut c) = child.take() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
            }
            Flavor::Synapse { env, running } => {
                if *running {
                    let mut cmd = env.script("stop.sh");
                    cmd.arg(&self.dir);
                    let _ = tokio::task::spawn_blocking(move || cmd.output()).await;
                    *running = false;
                }
            }
        }
    }

    /// Creates (courier) or registers and logs in (Synapse) the devices `device_ids`
    /// of user `localpart`; returns their credentials, in order.
    pub async fn devices(
        &mut self,
        localpart: &str,
        device_ids: &[String],
    ) -> anyhow::Result<Vec<Device>> {
        let user_id = format!("@{localpart}:{}", self.server_name);
        let mut tokens: Vec<String> = Vec::with_capacity(device_ids.len());
        let mut rest = device_ids;
        if let Flavor::Synapse { env, .. } = &self.flavor
            && !self.registered.contains(localpart)
            && let Some((first, others)) = device_ids.split_first()
        {
            let mut cmd = env.script("register.sh");
            cmd.env("REGISTER_OUTPUT", "json")
                .arg(&self.dir)
                .arg(localpart)
                .arg(password_of(localpart))
                .arg(first);
            let out = tokio::task::spawn_blocking(move || cmd.output())
                .await?
                .context("running register.sh")?;
            if !out.status.success() {
                bail!(
                    "register.sh failed on {}: {}",
                    self.label,
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            self.registered.insert(localpart.to_owned());
            let v: Value =
                serde_json::from_slice(&out.stdout).context("register.sh printed no JSON")?;
            let token = match v["access_token"].as_str() {
                Some(t) => t.to_owned(),
                None => bail!("register.sh printed no access_token: {v}"),
            };
            // Registration itself created a device of its own: remove it, or `*`
            // would address it too (and its messages would never be collected).
            self.delete_other_devices(localpart, &token, first).await?;
            tokens.push(token);
            rest = others;
        }
        let this = &*self;
        let more: Vec<anyhow::Result<String>> = futures::stream::iter(rest)
            .map(|d| this.one_device(&user_id, localpart, d))
            .buffered(4)
            .collect()
            .await;
        for t in more {
            tokens.push(t?);
        }
        Ok(device_ids
            .iter()
            .zip(tokens)
            .map(|(d, token)| Device {
                base: self.base.clone(),
                user_id: user_id.clone(),
                device_id: d.clone(),
                token,
            })
            .collect())
    }

    /// Synapse: deletes every device of `localpart` but `keep` (user-interactive
    /// auth with the password).
    async fn delete_other_devices(
        &self,
        localpart: &str,
        token: &str,
        keep: &str,
    ) -> anyhow::Result<()> {
        let list: Value = self
            .http
            .get(format!("{}/_matrix/client/v3/devices", self.base))
            .bearer_auth(token)
            .timeout(Duration::from_secs(30))
            .send()
            .await?
            .json()
            .await?;
        let others: Vec<&str> = list["devices"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|d| d["device_id"].as_str())
                    .collect::<Vec<&str>>()
            })
            .unwrap_or_default()
            .into_iter()
            .filter(|d| *d != keep)
            .collect();
        if others.is_empty() {
            return Ok(());
        }
        let url = format!("{}/_matrix/client/v3/delete_devices", self.base);
        let first: Value = self
            .http
            .post(&url)
            .bearer_auth(token)
            .json(&json!({"devices": others}))
            .timeout(Duration::from_secs(30))
            .send()
            .await?
            .json()
            .await
            .unwrap_or(Value::Null);
        let body = json!({
            "devices": others,
            "auth": {
                "type": "m.login.password",
                "identifier": {"type": "m.id.user", "user": localpart},
                "password": password_of(localpart),
                "session": first["session"],
            },
        });
        let r = self
            .http
            .post(&url)
            .bearer_auth(token)
            .json(&body)
            .timeout(Duration::from_secs(60))
            .send()
            .await?;
        if !r.status().is_success() {
            bail!(
                "{}: cannot delete the registration device: {} {}",
                self.label,
                r.status(),
                r.text().await.unwrap_or_default()
            );
        }
        Ok(())
    }

    /// A token for one device: courier's admin API, or a Synapse password login.
    async fn one_device(
        &self,
        user_id: &str,
        localpart: &str,
        device_id: &str,
    ) -> anyhow::Result<String> {
        if let Flavor::Synapse { .. } = self.flavor {
            return self
                .login(localpart, &password_of(localpart), device_id)
                .await;
        }
        let r = self
            .http
            .post(format!("{}/_courier/admin/v1/devices", self.base))
            .bearer_auth(ADMIN_TOKEN)
            .json(&json!({"user_id": user_id, "device_id": device_id}))
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .with_context(|| format!("admin API of {}", self.label))?;
        let status = r.status();
        let v: Value = r.json().await.unwrap_or(Value::Null);
        match v["access_token"].as_str() {
            Some(t) if status.is_success() => Ok(t.to_owned()),
            _ => bail!("admin API of {} refused a device: {status} {v}", self.label),
        }
    }

    async fn login(
        &self,
        localpart: &str,
        password: &str,
        device_id: &str,
    ) -> anyhow::Result<String> {
        let body = json!({
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": localpart},
            "password": password,
            "device_id": device_id,
        });
        for _ in 0..20 {
            let r = self
                .http
                .post(format!("{}/_matrix/client/v3/login", self.base))
                .json(&body)
                .timeout(Duration::from_secs(60))
                .send()
                .await
                .with_context(|| format!("login on {}", self.label))?;
            let status = r.status();
            let v: Value = r.json().await.unwrap_or(Value::Null);
            if status.as_u16() == 429 {
                let wait = v["retry_after_ms"].as_u64().unwrap_or(500);
                tokio::time::sleep(Duration::from_millis(wait)).await;
                continue;
            }
            return match v["access_token"].as_str() {
                Some(t) if status.is_success() => Ok(t.to_owned()),
                _ => bail!("login on {} refused: {status} {v}", self.label),
            };
        }
        bail!("login on {} kept being rate-limited", self.label)
    }

    /// Starts the accounting of the measured phase (CPU time from now on).
    pub fn begin_accounting(&mut self) {
        self.cpu_accum_ticks = 0;
        self.cpu_base_ticks = self.pid().and_then(proc_cpu_ticks).unwrap_or(0);
        self.sample_hwm();
    }

    fn account_before_stop(&mut self) {
        if let Some(pid) = self.pid() {
            if let Some(t) = proc_cpu_ticks(pid) {
                self.cpu_accum_ticks += t.saturating_sub(self.cpu_base_ticks);
            }
            self.sample_hwm();
        }
        self.cpu_base_ticks = 0;
    }

    fn sample_hwm(&mut self) {
        if let Some(kib) = self.pid().and_then(proc_hwm_kib) {
            self.hwm_kib = self.hwm_kib.max(kib);
        }
    }

    /// CPU seconds (user + system) used since `begin_accounting`, restarts included.
    pub fn cpu_seconds(&self) -> f64 {
        let now = self
            .pid()
            .and_then(proc_cpu_ticks)
            .map(|t| t.saturating_sub(self.cpu_base_ticks))
            .unwrap_or(0);
        (self.cpu_accum_ticks + now) as f64 / clock_ticks_per_second()
    }

    /// Peak resident set (VmHWM) of the server process, over all its runs, in MiB.
    pub fn peak_rss_mib(&mut self) -> f64 {
        self.sample_hwm();
        self.hwm_kib as f64 / 1024.0
    }

    /// Bytes of federation traffic through this server's front port so far.
    pub fn wire_bytes(&self) -> u64 {
        self.wire.bytes()
    }

    /// Size of the server's store: courier's data dir, Synapse's SQLite files.
    pub fn store_bytes(&self) -> u64 {
        match self.flavor {
            Flavor::Courier { .. } => crate::store::Store::disk_usage(&self.dir.join("data")),
            Flavor::Synapse { .. } => ["homeserver.db", "homeserver.db-wal", "homeserver.db-shm"]
                .iter()
                .filter_map(|f| std::fs::metadata(self.dir.join(f)).ok())
                .map(|m| m.len())
                .sum(),
        }
    }

    /// Stops the server and counts the messages its store still holds (courier:
    /// `inbox` + `outbox` + `parked` rows; Synapse: `device_inbox` +
    /// `device_federation_outbox` rows). `None` if the store cannot be read.
    /// A courier store is then compacted (reopening it has already replayed and
    /// flushed its write-ahead log): [`Node::store_bytes`] afterwards is the size of
    /// what is really left.
    pub async fn stop_and_count_pending(&mut self) -> Option<u64> {
        self.stop().await;
        let dir = self.dir.clone();
        match &self.flavor {
            Flavor::Courier { .. } => tokio::task::spawn_blocking(move || {
                use crate::store::{Store, StoreOptions, cf};
                let store = Store::open(&dir.join("data/db"), &StoreOptions::default()).ok()?;
                let pending = [cf::INBOX, cf::OUTBOX, cf::PARKED]
                    .into_iter()
                    .map(|c| store.count(c) as u64)
                    .sum();
                store.compact_all();
                Some(pending)
            })
            .await
            .ok()
            .flatten(),
            Flavor::Synapse { env, .. } => {
                let python = env.venv.join("bin/python");
                let db = dir.join("homeserver.db");
                let out = tokio::task::spawn_blocking(move || {
                    Command::new(python)
                        .arg("-c")
                        .arg(
                            "import sqlite3, sys\n\
                             c = sqlite3.connect(sys.argv[1])\n\
                             print(sum(c.execute('SELECT COUNT(*) FROM ' + t).fetchone()[0]\n\
                             for t in ('device_inbox', 'device_federation_outbox')))",
                        )
                        .arg(db)
                        .output()
                })
                .await
                .ok()?
                .ok()?;
                String::from_utf8_lossy(&out.stdout).trim().parse().ok()
            }
        }
    }

    /// Federation transactions and EDUs this server has counted so far: courier's
    /// are the ones it SENT and had accepted (`/metrics`); Synapse's the ones it
    /// RECEIVED (its log's "Received txn" lines), Synapse having no metrics here.
    pub async fn federation_counts(&self) -> (u64, u64) {
        match self.flavor {
            Flavor::Courier { .. } => {
                let Ok(r) = self
                    .http
                    .get(format!("{}/metrics", self.base))
                    .bearer_auth(ADMIN_TOKEN)
                    .timeout(Duration::from_secs(10))
                    .send()
                    .await
                else {
                    return (0, 0);
                };
                let text = r.text().await.unwrap_or_default();
                (
                    prometheus_counter(&text, "courier_transactions_sent_total"),
                    prometheus_counter(&text, "courier_edus_sent_total"),
                )
            }
            Flavor::Synapse { .. } => {
                let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
                synapse_received_txns(&text)
            }
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        match &mut self.flavor {
            Flavor::Courier { child, .. } => {
                if let Some(mut c) = child.take() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
            }
            Flavor::Synapse { env, running } => {
                if *running {
                    let _ = env.script("stop.sh").arg(&self.dir).output();
                }
            }
        }
    }
}

fn password_of(localpart: &str) -> String {
    format!("bench-pw-of-{localpart}")
}

/// The sum of a Prometheus counter's samples in a text exposition (0 when absent).
pub fn prometheus_counter(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// Transactions and EDUs in Synapse's "Received txn ... (PDUs: p, EDUs: e)" log lines.
pub fn synapse_received_txns(log: &str) -> (u64, u64) {
    let mut txns = 0;
    let mut edus = 0;
    for line in log.lines() {
        if !line.contains("Received txn ") {
            continue;
        }
        let Some(tail) = line.rsplit("EDUs: ").next() else {
            continue;
        };
        let digits: String = tail.chars().take_while(char::is_ascii_digit).collect();
        if let Ok(n) = digits.parse::<u64>() {
            txns += 1;
            edus += n;
        }
    }
    (txns, edus)
}

/// utime + stime of a process, in clock ticks.
pub fn proc_cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state is field 3 of the whole line; utime is 14, stime 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Peak resident set size (VmHWM) of a process, in KiB.
pub fn proc_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The kernel's clock tick (USER_HZ): `getconf CLK_TCK`, 100 if that fails.
pub fn clock_ticks_per_second() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|t| *t > 0.0)
            .unwrap_or(100.0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_counters_are_summed_and_exact_by_name() {
        let text = "# TYPE courier_edus_sent_total counter\n\
                    courier_edus_sent_total 1200\n\
                    courier_edus_sent_total_other 5\n\
                    courier_transactions_sent_total{dest=\"a\"} 3\n\
                    courier_transactions_sent_total{dest=\"b\"} 4\n";
        assert_eq!(prometheus_counter(text, "courier_edus_sent_total"), 1200);
        assert_eq!(
            prometheus_counter(text, "courier_transactions_sent_total"),
            7
        );
        assert_eq!(prometheus_counter(text, "courier_missing_total"), 0);
    }

    #[test]
    fn synapse_log_lines_are_counted() {
        let log = "2025 - synapse.federation.transport.server.federation - 113 - INFO - \
                   PUT-1 - Received txn 17 from 127.0.0.1:9. (PDUs: 0, EDUs: 7)\n\
                   unrelated line EDUs: 99\n\
                   x - Received txn 18 from 127.0.0.1:9. (PDUs: 0, EDUs: 100)\n";
        assert_eq!(synapse_received_txns(log), (2, 107));
    }

    #[test]
    fn own_process_stats_are_readable() {
        let pid = std::process::id();
        assert!(proc_cpu_ticks(pid).is_some());
        assert!(proc_hwm_kib(pid).unwrap_or(0) > 0);
        assert!(clock_ticks_per_second() > 0.0);
    }
}
