//! One-for-one supervision with capped exponential backoff and a
//! restart-intensity limit.
//!
//! Restart delays (attempt n = restarts within the intensity window):
//!
//! | restart | delay  |
//! |---------|--------|
//! | 1       | 100 ms |
//! | 2       | 200 ms |
//! | 3       | 400 ms |
//! | 4       | 800 ms |
//! | 5       | 1.6 s  |
//! | 6+      | 5 s (cap) |
//!
//! More than `max_restarts` restarts of one child within `window` means the
//! fault is not transient: the supervisor gives up and fails itself, which
//! escalates to its own supervisor (and, at the root, stops the node with a
//! non-zero exit instead of spinning forever).

use crate::stats::{ActorStats, StatsRegistry};
use futures::future::BoxFuture;
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, SupervisionEvent};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct RestartPolicy {
    pub base: Duration,
    pub cap: Duration,
    pub max_restarts: usize,
    pub window: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(5),
            max_restarts: 10,
            window: Duration::from_secs(60),
        }
    }
}

/// Restart history of one child.
#[derive(Default, Debug)]
pub struct Backoff {
    recent: VecDeque<Instant>,
}

impl Backoff {
    /// Records a failure now; returns the delay before the restart, or `None`
    /// when the intensity limit is exceeded.
    pub fn next_delay(&mut self, policy: &RestartPolicy) -> Option<Duration> {
        let now = Instant::now();
        while self
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > policy.window)
        {
            self.recent.pop_front();
        }
        self.recent.push_back(now);
        let n = self.recent.len();
        if n > policy.max_restarts {
            return None;
        }
        let factor = 1u32 << (n - 1).min(16);
        Some(policy.base.saturating_mul(factor).min(policy.cap))
    }
}

/// Starts (or restarts) one child linked to `supervisor`.
pub type StartFn = Arc<
    dyn Fn(ActorCell) -> BoxFuture<'static, Result<ActorCell, ActorProcessingErr>> + Send + Sync,
>;

#[derive(Clone)]
pub struct ChildSpec {
    pub name: String,
    pub start: StartFn,
}

/// The stop reason that retires a child for good: its supervisor does not
/// restart it. A node shutting down stops its watcher first, so that no new
/// work comes in while the documents in flight finish; restarted, the
/// watcher would rescan and admit work again.
pub const RETIRE: &str = "shutdown";

pub struct Supervisor;

pub struct SupervisorArgs {
    pub path: String,
    pub children: Vec<ChildSpec>,
    pub policy: RestartPolicy,
    pub registry: StatsRegistry,
}

pub struct SupervisorState {
    path: String,
    specs: HashMap<String, StartFn>,
    running: HashMap<ractor::ActorId, String>,
    backoff: HashMap<String, Backoff>,
    policy: RestartPolicy,
    stats: Arc<ActorStats>,
    stopping: bool,
}

pub enum SupervisorMsg {
    Restart(String),
    /// Stops children in order, then itself.
    Shutdown,
}

impl Actor for Supervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: SupervisorArgs,
    ) -> Result<SupervisorState, ActorProcessingErr> {
        let stats = args.registry.entry(&args.path);
        let mut state = SupervisorState {
            path: args.path,
            specs: HashMap::new(),
            running: HashMap::new(),
            backoff: HashMap::new(),
            policy: args.policy,
            stats,
            stopping: false,
        };
        for child in args.children {
            let cell = (child.start)(myself.get_cell()).await?;
            state.running.insert(cell.get_id(), child.name.clone());
            state.specs.insert(child.name, child.start);
        }
        state.stats.set_status("running");
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: SupervisorMsg,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::Restart(name) if !state.stopping => {
                let start = state.specs[&name].clone();
                match start(myself.get_cell()).await {
                    Ok(cell) => {
                        state.running.insert(cell.get_id(), name);
                        state.stats.set_status("running");
                    }
                    Err(e) => {
                        tracing::error!(supervisor = %state.path, child = %name, "restart failed: {e}");
                        state
                            .stats
                            .set_error(format!("restart of {name} failed: {e}"));
                        schedule_restart(&myself, state, name)?;
                    }
                }
            }
            SupervisorMsg::Restart(_) => {}
            SupervisorMsg::Shutdown => {
                state.stopping = true;
                for cell in myself.get_children() {
                    let _ = cell
                        .stop_and_wait(Some(RETIRE.into()), Some(Duration::from_secs(30)))
                        .await;
                }
                myself.stop(Some(RETIRE.into()));
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        evt: SupervisionEvent,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, why) = match evt {
            SupervisionEvent::ActorTerminated(cell, _, Some(reason)) if reason == RETIRE => {
                if let Some(name) = state.running.remove(&cell.get_id()) {
                    tracing::info!(supervisor = %state.path, child = %name, "child retired");
                }
                return Ok(());
            }
            SupervisionEvent::ActorFailed(cell, err) => (cell, format!("failed: {err}")),
            SupervisionEvent::ActorTerminated(cell, _, reason) => (
                cell,
                format!("stopped: {}", reason.unwrap_or_else(|| "no reason".into())),
            ),
            _ => return Ok(()),
        };
        let Some(name) = state.running.remove(&cell.get_id()) else {
            return Ok(());
        };
        if state.stopping {
            return Ok(());
        }
        tracing::warn!(supervisor = %state.path, child = %name, "child {why}; restarting");
        state.stats.set_error(format!("{name} {why}"));
        schedule_restart(&myself, state, name)
    }
}

fn schedule_restart(
    myself: &ActorRef<SupervisorMsg>,
    state: &mut SupervisorState,
    name: String,
) -> Result<(), ActorProcessingErr> {
    let delay = state
        .backoff
        .entry(name.clone())
        .or_default()
        .next_delay(&state.policy);
    let Some(delay) = delay else {
        state.stats.set_status("failed");
        return Err(format!(
            "{}: child {name} exceeded {} restarts in {:?}; escalating",
            state.path, state.policy.max_restarts, state.policy.window
        )
        .into());
    };
    state.stats.restarts.fetch_add(1, Ordering::Relaxed);
    state.stats.set_status("restarting");
    let me = myself.clone();
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        let _ = me.cast(SupervisorMsg::Restart(name));
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_caps_and_enforces_intensity() {
        let policy = RestartPolicy {
            base: Duration::from_millis(100),
            cap: Duration::from_millis(500),
            max_restarts: 5,
            window: Duration::from_secs(60),
        };
        let mut b = Backoff::default();
        let delays: Vec<_> = (0..5)
            .map(|_| b.next_delay(&policy).unwrap().as_millis())
            .collect();
        assert_eq!(delays, vec![100, 200, 400, 500, 500]);
        assert_eq!(b.next_delay(&policy), None);
    }

    struct Flaky;
    impl Actor for Flaky {
        type Msg = ();
        type State = ();
        type Arguments = ();
        async fn pre_start(&self, _: ActorRef<()>, _: ()) -> Result<(), ActorProcessingErr> {
            Ok(())
        }
        async fn handle(
            &self,
            _: ActorRef<()>,
            _: (),
            _: &mut (),
        ) -> Result<(), ActorProcessingErr> {
            panic!("boom")
        }
    }

    /// A root supervisor of one child.
    async fn supervise(
        name: &str,
        start: StartFn,
        policy: RestartPolicy,
        registry: &StatsRegistry,
    ) -> ActorRef<SupervisorMsg> {
        let args = SupervisorArgs {
            path: "root".into(),
            children: vec![ChildSpec {
                name: name.into(),
                start,
            }],
            policy,
            registry: registry.clone(),
        };
        Actor::spawn(None, Supervisor, args).await.unwrap().0
    }

    /// A child stopped with [`RETIRE`] stays stopped; one stopped for any
    /// other reason comes back.
    #[tokio::test]
    async fn a_retired_child_is_not_restarted() {
        const NAME: &str = "idle-test-child";
        let registry = StatsRegistry::default();
        let start: StartFn = Arc::new(|sup: ActorCell| {
            Box::pin(async move {
                // Sent nothing, so it never panics: only stopped.
                let (r, _) = Actor::spawn_linked(Some(NAME.into()), Flaky, (), sup).await?;
                Ok(r.get_cell())
            })
        });
        let policy = RestartPolicy {
            base: Duration::from_millis(10),
            ..RestartPolicy::default()
        };
        let sup = supervise("idle", start, policy, &registry).await;
        let restarts = || {
            registry
                .get("root")
                .unwrap()
                .restarts
                .load(Ordering::Relaxed)
        };
        let stop = |reason: &str| {
            let child: ActorRef<()> = ActorRef::where_is(NAME).expect("child registered");
            child.stop(Some(reason.into()));
        };

        stop("some other reason");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !(restarts() == 1 && ractor::registry::where_is(NAME).is_some()) {
            assert!(Instant::now() < deadline, "child not restarted");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

        stop(RETIRE);
        // Twenty times the first restart's delay.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(restarts(), 1);
        assert!(ractor::registry::where_is(NAME).is_none());
        sup.stop(None);
    }

    #[tokio::test]
    async fn a_panicking_child_is_restarted_and_counted() {
        let registry = StatsRegistry::default();
        let start: StartFn = Arc::new(|sup: ActorCell| {
            Box::pin(async move {
                let (r, _) =
                    Actor::spawn_linked(Some("flaky-test-child".into()), Flaky, (), sup).await?;
                Ok(r.get_cell())
            })
        });
        let sup = supervise("flaky", start, RestartPolicy::default(), &registry).await;
        for round in 1..=2u64 {
            let child: ActorRef<()> =
                ActorRef::where_is("flaky-test-child").expect("child registered");
            child.cast(()).unwrap();
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                tokio::time::sleep(Duration::from_millis(20)).await;
                let stats = registry.get("root").unwrap();
                let restarted = stats.restarts.load(Ordering::Relaxed) == round
                    && ractor::registry::where_is("flaky-test-child").is_some();
                if restarted {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "child not restarted (round {round})"
                );
            }
        }
        assert!(registry
            .get("root")
            .unwrap()
            .last_error()
            .unwrap()
            .contains("boom"));
        sup.stop(None);
    }
}
