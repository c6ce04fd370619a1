//! Test harness: real `courier` processes on loopback, each in its own temp folder.
//!
//! `Courier::start` picks a free port, writes a config, starts the binary and waits
//! until it answers. Dropping the handle kills the process and removes the folder.
#![allow(dead_code)]

pub mod matrix;
pub mod proxy;
pub mod synapse;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// Path of the built binary.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_courier"))
}

/// A port nobody listens on right now.
/// Picked below Linux's ephemeral range (32768+), so an outgoing connection of
/// another test cannot take it between this check and the server's bind.
pub fn free_port() -> u16 {
    use rand::RngExt;
    loop {
        let port = rand::rng().random_range(20_000..32_000u16);
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

pub struct Courier {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub server_name: String,
    pub child: Option<Child>,
    /// Extra TOML appended to the generated config.
    pub extra: String,
    /// `[admin] token`; `None` leaves the admin API disabled.
    pub admin_token: Option<String>,
}

impl Courier {
    /// Starts a courier with default test settings plus `extra` TOML.
    pub async fn start_with(extra: &str) -> Courier {
        Self::start_with_admin_token(extra, Some(ADMIN_TOKEN)).await
    }

    /// Starts a courier whose `[admin] token` is `admin_token` (`None`: no admin API).
    pub async fn start_with_admin_token(extra: &str, admin_token: Option<&str>) -> Courier {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut c = Courier {
            dir,
            port,
            server_name: format!("127.0.0.1:{port}"),
            child: None,
            extra: extra.to_owned(),
            admin_token: admin_token.map(str::to_owned),
        };
        // Another test may grab the port between the check and the bind: try anew.
        for _ in 0..5 {
            c.write_config();
            match c.try_spawn().await {
                Ok(()) => return c,
                Err(log) if log.contains("binding") => {
                    let _ = std::fs::remove_file(c.log_path());
                    c.port = free_port();
                    c.server_name = format!("127.0.0.1:{}", c.port);
                }
                Err(log) => panic!("courier exited early; log:\n{log}"),
            }
        }
        panic!("no free port after 5 tries");
    }

    pub async fn start() -> Courier {
        Self::start_with("").await
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("courier.toml")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("courier.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn write_config(&self) {
        // Top-level keys must come before any table: split `extra` accordingly.
        let (top, tables): (Vec<&str>, Vec<&str>) = {
            let idx = self.extra.find('[').unwrap_or(self.extra.len());
            (vec![&self.extra[..idx]], vec![&self.extra[idx..]])
        };
        let text = format!(
            r#"server_name = "{name}"
data_dir = "data"
signing_key = "keys/signing.key"
{top}
[[listeners]]
address = "127.0.0.1:{port}"
resources = ["federation", "client", "admin"]

{admin}
[log]
level = "courier=debug,info"
{tables}
"#,
            name = self.server_name,
            port = self.port,
            top = top.join(""),
            tables = tables.join(""),
            admin = match &self.admin_token {
                Some(t) => format!("[admin]\ntoken = \"{t}\"\n"),
                None => String::new(),
            },
        );
        let text = if text.contains("[federation]") {
            text
        } else {
            format!(
                "{text}\n[federation]\nallow_private_destinations = true\nverify_certificates = false\n"
            )
        };
        std::fs::write(self.config_path(), text).unwrap();
    }

    /// Starts the process (again) and waits until it serves.
    pub async fn spawn(&mut self) {
        if let Err(log) = self.try_spawn().await {
            panic!("courier exited early; log:\n{log}");
        }
    }

    /// Starts the process; `Err(log)` if it exited before serving.
    pub async fn try_spawn(&mut self) -> Result<(), String> {
        self.try_spawn_with(|_| {}).await
    }

    /// As [`Courier::try_spawn`], with the command changed by `adjust` first (its
    /// environment, say).
    pub async fn try_spawn_with(
        &mut self,
        adjust: impl FnOnce(&mut Command),
    ) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let mut cmd = Command::new(bin());
        cmd.arg("serve")
            .arg("--config")
            .arg(self.config_path())
            .stdout(Stdio::null())
            .stderr(log);
        adjust(&mut cmd);
        self.child = Some(cmd.spawn().expect("start courier"));
        self.wait_ready().await
    }

    /// The running process's pid.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub async fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let client = insecure_client();
        loop {
            if let Some(child) = &mut self.child
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(format!("exit {status}\n{}", self.log()));
            }
            if let Ok(r) = client
                .get(self.url("/_matrix/federation/v1/version"))
                .send()
                .await
                && r.status().is_success()
            {
                return Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "courier did not start; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{}", self.port, path)
    }

    /// SIGKILL, no goodbye.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait; returns the exit status code.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(s)) = c.try_wait() {
                return s.code();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Opens the store of a stopped courier (RocksDB admits one process at a time).
    pub fn open_store(&self) -> courier::store::Store {
        assert!(
            self.child.is_none(),
            "stop the courier before opening its store"
        );
        courier::store::Store::open(&self.data_dir().join("db"), &Default::default()).unwrap()
    }

    /// A client that trusts exactly this courier's generated certificate.
    pub fn pinned_client(&self) -> reqwest::Client {
        let pem = std::fs::read(self.data_dir().join("tls/cert.pem")).unwrap();
        let cert = reqwest::Certificate::from_pem(&pem).unwrap();
        reqwest::Client::builder()
            .tls_certs_only([cert])
            .build()
            .unwrap()
    }
}

impl Drop for Courier {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A client that accepts any certificate (for readiness probes only).
pub fn insecure_client() -> reqwest::Client {
    reqwest::Client::builder()
        .tls_danger_accept_invalid_certs(true)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// Runs the courier binary with `args` and `stdin`; returns (exit code, stdout, stderr).
pub fn run_cli(args: &[&str], stdin: &str, cwd: &Path) -> (i32, String, String) {
    use std::io::Write;
    let mut child = Command::new(bin())
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
