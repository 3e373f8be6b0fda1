//! Fault injection around any [`Coordination`]: replies lost after the service applied the call,
//! calls delayed, sessions expired, all by a seeded plan, so that a test replays the same faults.
//!
//! This wraps the real thing (ZooKeeper or the embedded server): the call really runs and takes
//! effect; then, as the plan says, the caller gets [`CoordError::ConnectionLoss`] instead of the
//! answer, which is exactly what a reply lost on the wire looks like to a ZooKeeper client. It is
//! how the recipes are tested against "what if this call's reply is lost after the server
//! applied it?". An expiry runs the [`Expirer`] given to [`FaultyCoordination::with_expirer`]
//! (for instance [`EmbeddedCoordination::expire`](super::EmbeddedCoordination::expire) or
//! [`ZkCoordination::expire_session`](super::ZkCoordination::expire_session)) right after a call
//! took effect, as if the session had expired while its reply was on the way.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use tokio::sync::watch;

use super::{
    CoordError, Coordination, CreateMode, Op, OpResult, Result, SessionStatus, Stat, TreeWatch, Version, Watch,
};

/// A kind of call, for [`Faults`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CallKind {
    /// `create`.
    Create,
    /// `get`, `get_watch`, `exists`, `exists_watch`.
    Read,
    /// `children`, `children_watch`.
    Children,
    /// `set`.
    Set,
    /// `delete`.
    Delete,
    /// `multi`.
    Multi,
}

/// Lose the replies of the next `count` calls of `kind` on paths starting with `path_prefix`
/// (after they took effect).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoseNext {
    /// The kind of call.
    pub kind: CallKind,
    /// Paths it applies to (`""` for all; a multi's path is `""`).
    pub path_prefix: String,
    /// Matching calls to let through before losing any.
    pub after: u32,
    /// How many replies are still to be lost.
    pub count: u32,
}

/// What to do to calls: deterministic rules first, then seeded random ones.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Replies to lose, deterministically.
    pub lose_next: Vec<LoseNext>,
    /// Lose each reply with this probability, 0 to 1 (after the call took effect).
    pub lose_probability: f64,
    /// Delay each call by up to this long, uniformly (before it runs).
    pub max_delay: Duration,
    /// Expire the session after each call with this probability, 0 to 1 (needs an
    /// [`Expirer`]; the call's reply is lost with it).
    pub expire_probability: f64,
    /// Seed of the random choices.
    pub seed: u64,
}

struct State {
    faults: Faults,
    rng: u64,
    lost: u64,
    expired: u64,
}

/// Ends the wrapped handle's session from the outside (see the module's documentation).
pub type Expirer = Arc<dyn Fn() -> BoxFuture<'static, ()> + Send + Sync>;

/// A [`Coordination`] that runs every call on `inner` and then, as its [`Faults`] say, loses the
/// reply or delays the call. Cheap to clone; clones share the plan.
#[derive(Clone)]
pub struct FaultyCoordination {
    inner: Arc<dyn Coordination>,
    state: Arc<Mutex<State>>,
    expirer: Option<Expirer>,
}

impl FaultyCoordination {
    /// Wraps `inner` with no faults.
    pub fn new(inner: Arc<dyn Coordination>) -> Self {
        let state = State { faults: Faults::default(), rng: 0x9e37_79b9_7f4a_7c15, lost: 0, expired: 0 };
        FaultyCoordination { inner, state: Arc::new(Mutex::new(state)), expirer: None }
    }

    /// Wraps `inner`, whose session `expirer` can end, with no faults.
    pub fn with_expirer(inner: Arc<dyn Coordination>, expirer: Expirer) -> Self {
        FaultyCoordination { expirer: Some(expirer), ..Self::new(inner) }
    }

    /// Expires the session now (does nothing without an [`Expirer`]).
    pub async fn expire_now(&self) {
        if let Some(expirer) = &self.expirer {
            self.state.lock().unwrap_or_else(|p| p.into_inner()).expired += 1;
            expirer().await;
        }
    }

    /// Sessions expired so far.
    pub fn expired_sessions(&self) -> u64 {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).expired
    }

    /// Replaces the plan (and reseeds).
    pub fn set_faults(&self, faults: Faults) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.rng = faults.seed | 1;
        state.faults = faults;
    }

    /// Replies lost so far.
    pub fn lost_replies(&self) -> u64 {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).lost
    }

    /// Decides for one call: its delay, whether its reply is lost, whether the session expires.
    fn plan(&self, kind: CallKind, path: &str) -> (Duration, bool, bool) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = || {
            // xorshift64*
            state.rng ^= state.rng >> 12;
            state.rng ^= state.rng << 25;
            state.rng ^= state.rng >> 27;
            (state.rng.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
        };
        let (u, v, w) = (next(), next(), next());
        let delay = state.faults.max_delay.mul_f64(u);
        let mut lose = v < state.faults.lose_probability;
        let expire = self.expirer.is_some() && w < state.faults.expire_probability;
        let rule = state
            .faults
            .lose_next
            .iter_mut()
            .find(|r| r.kind == kind && r.count > 0 && path.starts_with(&r.path_prefix));
        if let Some(rule) = rule {
            if rule.after > 0 {
                rule.after -= 1;
            } else {
                rule.count -= 1;
                lose = true;
            }
        }
        if expire {
            state.expired += 1;
        }
        if lose {
            state.lost += 1;
        }
        (delay, lose, expire)
    }

    async fn call<T>(
        &self,
        kind: CallKind,
        path: &str,
        call: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let (delay, lose, expire) = self.plan(kind, path);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let result = call.await;
        if let (true, Some(expirer)) = (expire, &self.expirer) {
            expirer().await;
            return Err(CoordError::SessionExpired);
        }
        if lose {
            return Err(CoordError::ConnectionLoss);
        }
        result
    }
}

#[async_trait]
impl Coordination for FaultyCoordination {
    fn status(&self) -> SessionStatus {
        self.inner.status()
    }

    fn subscribe(&self) -> watch::Receiver<SessionStatus> {
        self.inner.subscribe()
    }

    fn session_id(&self) -> i64 {
        self.inner.session_id()
    }

    fn session_timeout(&self) -> Duration {
        self.inner.session_timeout()
    }

    async fn create(&self, path: &str, data: &[u8], mode: CreateMode) -> Result<String> {
        self.call(CallKind::Create, path, self.inner.create(path, data, mode)).await
    }

    async fn get(&self, path: &str) -> Result<(Vec<u8>, Stat)> {
        self.call(CallKind::Read, path, self.inner.get(path)).await
    }

    async fn get_watch(&self, path: &str) -> Result<(Vec<u8>, Stat, Watch)> {
        self.call(CallKind::Read, path, self.inner.get_watch(path)).await
    }

    async fn exists(&self, path: &str) -> Result<Option<Stat>> {
        self.call(CallKind::Read, path, self.inner.exists(path)).await
    }

    async fn exists_watch(&self, path: &str) -> Result<(Option<Stat>, Watch)> {
        self.call(CallKind::Read, path, self.inner.exists_watch(path)).await
    }

    async fn set(&self, path: &str, data: &[u8], expected: Option<Version>) -> Result<Stat> {
        self.call(CallKind::Set, path, self.inner.set(path, data, expected)).await
    }

    async fn delete(&self, path: &str, expected: Option<Version>) -> Result<()> {
        self.call(CallKind::Delete, path, self.inner.delete(path, expected)).await
    }

    async fn children(&self, path: &str) -> Result<Vec<String>> {
        self.call(CallKind::Children, path, self.inner.children(path)).await
    }

    async fn children_watch(&self, path: &str) -> Result<(Vec<String>, Watch)> {
        self.call(CallKind::Children, path, self.inner.children_watch(path)).await
    }

    async fn multi(&self, ops: Vec<Op>) -> Result<Vec<OpResult>> {
        self.call(CallKind::Multi, "", self.inner.multi(ops)).await
    }

    async fn watch_tree(&self, path: &str) -> Result<TreeWatch> {
        self.inner.watch_tree(path).await
    }

    async fn close(&self) {
        self.inner.close().await
    }
}
