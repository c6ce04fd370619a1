//! Real Synapse homeservers on loopback, through `../shared/peers/synapse/`.
//!
//! `Synapse::venv()` installs the pinned Synapse once per machine (into
//! `$HOME/.cache/courier-synapse`). Without Python or the download the Synapse tests
//! skip with a message, except under CI (`CI=true`), where they fail loudly.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/peers/synapse")
}

/// The venv holding Synapse, or why there is none.
pub fn venv() -> Result<PathBuf, String> {
    let root = std::env::var_os("COURIER_SYNAPSE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/tmp".into()))
                .join(".cache/courier-synapse")
        });
    let install = scripts().join("install.sh");
    if !install.exists() {
        return Err(format!("{} not found", install.display()));
    }
    // Several tests may ask at once: serialize installs with a lock file.
    std::fs::create_dir_all(&root).map_err(|e| e.to_string())?;
    let out = Command::new("flock")
        .arg(root.join(".install.lock"))
        .arg("bash")
        .arg(&install)
        .arg(&root)
        .output()
        .map_err(|e| format!("cannot run install.sh: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "install.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        ));
    }
    Ok(root.join("venv"))
}

/// Returns the venv, or prints why the test is skipped (panics under CI).
pub fn venv_or_skip(test: &str) -> Option<PathBuf> {
    match venv() {
        Ok(v) => Some(v),
        Err(why) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("{test}: Synapse is required in CI but unavailable: {why}")
        }
        Err(why) => {
            eprintln!("SKIPPED {test}: Synapse unavailable ({why})");
            None
        }
    }
}

pub struct Synapse {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub server_name: String,
    venv: PathBuf,
}

impl Synapse {
    pub fn start(venv: &Path) -> Synapse {
        let dir = tempfile::tempdir().unwrap();
        let port = super::free_port();
        let s = Synapse {
            dir,
            port,
            server_name: format!("127.0.0.1:{port}"),
            venv: venv.to_owned(),
        };
        s.run_start();
        s
    }

    /// Starts a Synapse whose `homeserver.yaml` also holds `extra` (YAML, appended
    /// after the first start wrote the file; the server is then restarted).
    pub fn start_configured(venv: &Path, extra: &str) -> Synapse {
        let s = Synapse::start(venv);
        s.stop();
        let path = s.dir.path().join("homeserver.yaml");
        let mut yaml = std::fs::read_to_string(&path).unwrap();
        yaml.push_str("\n# --- added by the courier tests ---\n");
        yaml.push_str(extra);
        std::fs::write(&path, yaml).unwrap();
        s.run_start();
        s
    }

    /// Rows of `table` in the homeserver's sqlite database (read with the venv's
    /// Python, so no sqlite3 tool is needed).
    pub fn count_rows(&self, table: &str) -> i64 {
        let db = self.dir.path().join("homeserver.db");
        let out = Command::new(self.venv.join("bin/python"))
            .arg("-c")
            .arg(format!(
                "import sqlite3,sys; c=sqlite3.connect(sys.argv[1], timeout=30); \
                 print(c.execute('select count(*) from {table}').fetchone()[0])"
            ))
            .arg(&db)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    }

    fn script(&self, name: &str) -> Command {
        let mut c = Command::new("bash");
        c.arg(scripts().join(name)).env("SYNAPSE_VENV", &self.venv);
        c
    }

    fn run_start(&self) {
        let out = self
            .script("start.sh")
            .arg(self.dir.path())
            .arg(&self.server_name)
            .arg(self.port.to_string())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "synapse start failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts it again after `stop` (same data).
    pub fn restart(&self) {
        self.run_start();
    }

    pub fn stop(&self) {
        let _ = self.script("stop.sh").arg(self.dir.path()).output();
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{}", self.port, path)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("homeserver.log")).unwrap_or_default()
    }

    pub fn signing_key_path(&self) -> PathBuf {
        self.dir.path().join("signing.key")
    }

    /// Registers (or logs in) `user` with `device`; returns (user_id, access_token).
    pub fn register(&self, user: &str, device: &str) -> (String, String) {
        let out = self
            .script("register.sh")
            .env("REGISTER_OUTPUT", "json")
            .arg(self.dir.path())
            .arg(user)
            .arg("pw-of-".to_owned() + user)
            .arg(device)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        (
            v["user_id"].as_str().unwrap().to_owned(),
            v["access_token"].as_str().unwrap().to_owned(),
        )
    }
}

impl Drop for Synapse {
    fn drop(&mut self) {
        self.stop();
    }
}
