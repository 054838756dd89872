//! Whether Redis lists this node's sessions since its link last broke: the registrar
//! confirms it, the relay waits for it before telling its clients it hears again.

use std::time::Duration;

use tokio::sync::{watch, Notify};

/// How many breaks of the Redis link Redis is known to list this node's sessions after.
/// The relay tells its clients it hears again only once it is (see
/// [`super::relay::Inbox`]): a push through another node finds a uid's nodes in Redis, so
/// until then it would reach no one here, after a notice that promised everything since.
pub struct Listed {
    after_break: watch::Sender<u64>,
    check: Notify,
}

impl Default for Listed {
    fn default() -> Listed {
        Listed { after_break: watch::Sender::new(0), check: Notify::new() }
    }
}

impl Listed {
    /// Returns once Redis lists every session this node held when the link had broken
    /// `breaks` times: asks the registrar to check its liveness key now (and again each
    /// `every` while it waits), which writes every session again if Redis lost them.
    pub async fn after(&self, breaks: u64, every: Duration) {
        let mut listed = self.after_break.subscribe();
        loop {
            self.check.notify_one();
            if let Ok(Ok(_)) = tokio::time::timeout(every, listed.wait_for(|n| *n >= breaks)).await {
                return;
            }
        }
    }

    /// Resolves when the relay asks for a check.
    pub fn asked(&self) -> tokio::sync::futures::Notified<'_> {
        self.check.notified()
    }

    /// Redis lists every session this node held at `breaks` breaks of the link.
    pub fn confirm(&self, breaks: u64) {
        self.after_break.send_if_modified(|n| std::mem::replace(n, breaks.max(*n)) < breaks);
    }
}

