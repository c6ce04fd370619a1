//! In-memory wake-ups: "a device has new messages", "a destination has new EDUs".
//!
//! A hint, never the source of truth: a lost wake-up only delays delivery until the
//! next timer or request, because the store is re-read every time. Registration is
//! lazy and entries for devices nobody waits on are dropped, so this never grows with
//! the number of devices, only with the number of waiting `/sync`s.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// Wake-ups for device inboxes.
#[derive(Default)]
pub struct Notifier {
    devices: Mutex<HashMap<(String, String), Arc<Notify>>>,
}

impl Notifier {
    /// The handle a `/sync` waits on for `(user, device)`. Call `notified()` on it and
    /// `enable()` the future BEFORE reading the store, so nothing slips in between.
    pub fn device(&self, user: &str, device: &str) -> Arc<Notify> {
        let mut map = self.devices.lock().expect("notifier");
        if map.len() > 4096 {
            // Only waiters hold a clone; drop entries nobody waits on.
            map.retain(|_, n| Arc::strong_count(n) > 1);
        }
        map.entry((user.to_owned(), device.to_owned()))
            .or_default()
            .clone()
    }

    /// Wakes every `/sync` waiting on `(user, device)`.
    pub fn wake_device(&self, user: &str, device: &str) {
        let map = self.devices.lock().expect("notifier");
        if let Some(n) = map.get(&(user.to_owned(), device.to_owned())) {
            n.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wakes_registered_waiters_only() {
        let n = Notifier::default();
        let h = n.device("@a:x", "D");
        let fut = h.notified();
        tokio::pin!(fut);
        fut.as_mut().enable();
        n.wake_device("@a:x", "OTHER");
        assert!(futures::poll!(fut.as_mut()).is_pending());
        n.wake_device("@a:x", "D");
        assert!(futures::poll!(fut.as_mut()).is_ready());
    }
}
