//! Bridges between stages: where a stage's output goes and where its input
//! comes from.
//!
//! A stage holds a [`Port`] for its output and never learns what is behind
//! it: on the `local` bus it is the next stage's [`PoolQueue`], on the
//! `kafka` bus a producer for the topic between the two stages. On the input
//! side a [`kafka::Kafka::consume`] task feeds a stage's queue from its topic
//! and commits each message's offset only once the stage is done with it
//! (see [`crate::pool::Ack`]). Only versioned envelopes
//! ([`crate::messages::Envelope`]) cross a topic.

pub mod kafka;

use crate::pool::{Job, PoolQueue};
use serde::Serialize;
use std::sync::Arc;

/// Where a stage sends its output.
pub enum Port<T: Job> {
    Local(Arc<PoolQueue<T>>),
    Kafka {
        bus: Arc<kafka::Kafka>,
        topic: String,
    },
}

impl<T: Job> Clone for Port<T> {
    fn clone(&self) -> Self {
        match self {
            Port::Local(q) => Port::Local(q.clone()),
            Port::Kafka { bus, topic } => Port::Kafka {
                bus: bus.clone(),
                topic: topic.clone(),
            },
        }
    }
}

impl<T: Job + Serialize> Port<T> {
    /// Hands `job` on. For Kafka this returns once the broker has acked the
    /// message: the caller's own input may be committed after that. While
    /// the broker is unreachable it waits (the pipeline pauses) rather than
    /// failing the job into the DLQ for something that is not its fault.
    pub async fn send(&self, job: T) -> anyhow::Result<()> {
        match self {
            Port::Local(q) => {
                q.submit(job);
                Ok(())
            }
            Port::Kafka { bus, topic } => bus.publish(topic, job.doc_id(), &job).await,
        }
    }

    /// Hands `jobs` on in order, as [`Port::send`] each; a local queue takes
    /// them in one step.
    pub async fn send_all(&self, jobs: Vec<T>) -> anyhow::Result<()> {
        match self {
            Port::Local(q) => {
                q.submit_all(jobs);
                Ok(())
            }
            Port::Kafka { .. } => {
                for job in jobs {
                    self.send(job).await?;
                }
                Ok(())
            }
        }
    }
}
