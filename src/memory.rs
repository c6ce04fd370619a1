//! How the server process takes memory from the kernel: without transparent huge
//! pages.
//!
//! Owns one process-wide decision made once at start-up by `courier serve`. It must
//! never be called from library code a test or another program embeds: it changes
//! the whole process (and every child it starts afterwards).
//!
//! Why: mimalloc asks the kernel for huge pages (`madvise(MADV_HUGEPAGE)`) on its
//! arenas, so with THP in `madvise` (or `always`) mode each first touch of a 2 MiB
//! region faults in a whole huge page and zeroes it, and memory mimalloc purges in
//! 64 KiB pieces comes back the same way. In the benchmark's backlog drain that
//! zeroing was ~8 % of the receiving server's CPU; with huge pages off the same drain
//! took 12-15 % less CPU on each server and peak RSS fell by about 40 % (README,
//! "Where the time goes", item 26).

/// The environment variable with which mimalloc lets an operator decide instead.
pub const OPERATOR_SETTING: &str = "MIMALLOC_ALLOW_THP";

/// What [`avoid_transparent_huge_pages`] found or did, for the start-up log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HugePages {
    /// Turned off for this process now.
    Disabled,
    /// Left as the operator's `MIMALLOC_ALLOW_THP` says (mimalloc applies it).
    OperatorChoice(String),
    /// The kernel refused or does not know the setting; nothing changed.
    Unchanged(String),
}

impl HugePages {
    /// Says in the log what was found or done (once logging is set up).
    pub fn log(&self) {
        match self {
            HugePages::Disabled => tracing::debug!("transparent huge pages off for this process"),
            HugePages::OperatorChoice(v) => {
                tracing::info!("{OPERATOR_SETTING}={v}: transparent huge pages as set")
            }
            HugePages::Unchanged(why) => {
                tracing::warn!("could not turn transparent huge pages off: {why}")
            }
        }
    }
}

/// Turns transparent huge pages off for this process (`PR_SET_THP_DISABLE`),
/// unless the operator set [`OPERATOR_SETTING`].
pub fn avoid_transparent_huge_pages() -> HugePages {
    if let Ok(value) = std::env::var(OPERATOR_SETTING) {
        return HugePages::OperatorChoice(value);
    }
    disable()
}

#[cfg(target_os = "linux")]
fn disable() -> HugePages {
    match rustix::thread::disable_transparent_huge_pages(true) {
        Ok(()) => HugePages::Disabled,
        Err(e) => HugePages::Unchanged(e.to_string()),
    }
}

#[cfg(not(target_os = "linux"))]
fn disable() -> HugePages {
    HugePages::Unchanged("not Linux".into())
}
