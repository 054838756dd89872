//! Where a message goes beyond the local hub: the seam between this node and the others.
//!
//! The publish API hands every message to the registry, never to the hub directly. The
//! `memory` backend is one node, so the hub's answer is the whole answer; backends that
//! know other nodes add their delivery here, and the API does not change.

use std::sync::Arc;

use crate::conn::wire::Message;
use crate::hub::Hub;

pub enum Registry {
    /// One node: every session is in this process's hub.
    Memory,
}

/// What a push to uids reached.
pub struct Pushed {
    /// Connections of those uids found.
    pub online: usize,
    /// Connections the message was queued to.
    pub delivered: usize,
}

impl Registry {
    pub async fn push(&self, hub: &Hub, uids: &[String], msg: &Arc<Message>) -> Pushed {
        match self {
            Registry::Memory => {
                let (online, delivered) = hub.push(uids, msg).await;
                Pushed { online, delivered }
            }
        }
    }

    /// Returns the connections the message was queued to.
    pub async fn publish(&self, hub: &Hub, topic: &str, msg: &Arc<Message>) -> usize {
        match self {
            Registry::Memory => hub.publish(topic, msg).await,
        }
    }

    /// Returns the connections the message was queued to.
    pub async fn broadcast(&self, hub: &Hub, msg: &Arc<Message>) -> usize {
        match self {
            Registry::Memory => hub.broadcast(msg).await,
        }
    }
}
