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

/// What [`raise_open_files`] found or did, for the start-up log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenFiles {
    /// The soft limit was below the hard one and now equals it.
    Raised { from: u64, to: u64 },
    /// The soft limit already was the hard one (or above the cap of "unlimited").
    AtHardLimit(u64),
    /// The kernel refused, or this system has no such limit; nothing changed.
    Unchanged(String),
}

impl OpenFiles {
    /// Says in the log what was found or done (once logging is set up).
    pub fn log(&self) {
        match self {
            OpenFiles::Raised { from, to } => {
                tracing::info!(from, to, "raised the open-file limit to the hard limit")
            }
            OpenFiles::AtHardLimit(limit) => tracing::debug!(limit, "open-file limit"),
            OpenFiles::Unchanged(why) => tracing::warn!("{why}"),
        }
    }
}

/// The most a soft limit is raised to when the hard limit is "unlimited": Linux
/// refuses anything above `fs.nr_open` for this resource, and this is its default.
#[cfg(target_os = "linux")]
const UNLIMITED_CAP: u64 = 1 << 20;

/// Raises the soft open-file limit to the hard limit.
#[cfg(target_os = "linux")]
pub fn raise_open_files() -> OpenFiles {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let from = limit.current.unwrap_or(u64::MAX);
    let to = limit.maximum.unwrap_or(UNLIMITED_CAP);
    if from >= to {
        return OpenFiles::AtHardLimit(from);
    }
    let raised = Rlimit {
        current: Some(to),
        maximum: limit.maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => OpenFiles::Raised { from, to },
        Err(e) => OpenFiles::Unchanged(format!(
            "could not raise the open-file limit from {from} to {to}: {e}"
        )),
    }
}

#[cfg(not(target_os = "linux"))]
pub fn raise_open_files() -> OpenFiles {
    OpenFiles::Unchanged("not Linux: the open-file limit is left as it is".into())
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
