//! The process's open-file limit: raised at start-up to what the operator allows.
//!
//! Owns one process-wide decision, made once by `courier serve` and `courier bench`
//! before they open anything ([`raise_open_files`]; [`soft_open_files`] only reads).
//! It must never lower a limit, never touch the hard limit (only an operator may
//! raise that), and the raise must never be called from library code a test or
//! another program embeds.
//!
//! Why: every connection is a file descriptor (each client device, each peer
//! server, and in the benchmark 1000 simulated destinations with a listener and a
//! connection each). Shells and service managers commonly start a process with a
//! soft limit of 1024 while allowing far more (the hard limit, e.g. 524288 under
//! systemd). At 1024, `courier bench --scenario many-destinations` could not open
//! its destinations and gave up after its 120 s warm-up. Raising the soft limit to
//! the hard one is what Synapse does by default (`soft_file_limit: 0`) and what Go
//! programs get from their runtime.

/// The open-file limit before and after [`raise_open_files`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFiles {
    /// The soft limit the process started with.
    pub before: u64,
    /// The soft limit now.
    pub now: u64,
    /// The hard limit, the most the soft one can be raised to.
    pub hard: u64,
}

impl OpenFiles {
    /// Says in the log what was found or done (once logging is set up).
    pub fn log(&self) {
        if self.now > self.before {
            tracing::info!(
                from = self.before,
                to = self.now,
                "raised the open-file limit to the hard limit"
            );
        } else {
            tracing::debug!(limit = self.now, "open-file limit");
        }
    }
}

/// The most a soft limit is raised to when the hard limit is "unlimited": Linux
/// refuses anything above `fs.nr_open` for this resource, and this is its default.
#[cfg(target_os = "linux")]
const UNLIMITED_CAP: u64 = 1 << 20;

/// Raises the soft open-file limit to the hard limit; `Err` says why it could not
/// (nothing changed then).
#[cfg(target_os = "linux")]
pub fn raise_open_files() -> Result<OpenFiles, String> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let before = limit.current.unwrap_or(u64::MAX);
    let hard = limit.maximum.unwrap_or(UNLIMITED_CAP);
    if before >= hard {
        return Ok(OpenFiles {
            before,
            now: before,
            hard,
        });
    }
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(hard),
            maximum: limit.maximum,
        },
    )
    .map_err(|e| format!("could not raise the open-file limit from {before} to {hard}: {e}"))?;
    Ok(OpenFiles {
        before,
        now: hard,
        hard,
    })
}

#[cfg(not(target_os = "linux"))]
pub fn raise_open_files() -> Result<OpenFiles, String> {
    Err("not Linux: the open-file limit is left as it is".into())
}

/// The soft open-file limit now; `None` where it cannot be read (or is unlimited).
pub fn soft_open_files() -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        rustix::process::getrlimit(rustix::process::Resource::Nofile).current
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}
