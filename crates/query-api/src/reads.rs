//! One HTTP worker's read connections: a few shared, the rest of its pool held one at a time.
//!
//! A read that is one statement does not need a connection to itself. tokio-postgres
//! pipelines the statements of concurrent callers on one connection: it writes every waiting
//! request in one `send`, and Postgres answers them in order from one backend. Under load this
//! costs far fewer system calls and context switches, on both sides, than a connection per
//! request, and keeps as many backends busy as there are workers (see the speed-findings
//! note).
//!
//! Statements on one connection wait for the ones ahead of them. So a shared connection on
//! which nothing has finished for [`STALL`] while statements wait (a long aggregate at the
//! head) is passed over: the read takes another slot's, or a connection of its own from the
//! pool, as it would without sharing. Streams that hold a connection (exports) take one from
//! the pool for themselves.

use std::{
    ops::Deref,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use deadpool_postgres::{Object, Pool};
use fieldline_common::ApiError;

/// How long statements may wait on a shared connection on which nothing finishes before
/// reads go around it.
pub const STALL: Duration = Duration::from_millis(100);

pub struct Reads {
    pool: Pool,
    slots: Vec<Slot>,
    /// Held while a slot is being connected, so that a burst opens one connection.
    filling: tokio::sync::Mutex<()>,
    epoch: Instant,
    /// [`STALL`], but in tests of what does not hinge on it.
    stall: Duration,
}

#[derive(Default)]
struct Slot {
    client: Mutex<Option<Arc<Object>>>,
    /// When (µs after `epoch`) a statement last finished on it, or it last went from idle
    /// to busy.
    progress: AtomicU64,
}

/// A connection for one statement, shared or not.
pub struct Lease<'a> {
    client: Arc<Object>,
    progress: Option<(&'a AtomicU64, Instant)>,
}

impl Deref for Lease<'_> {
    type Target = Object;

    fn deref(&self) -> &Object {
        &self.client
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let Some((progress, epoch)) = self.progress {
            progress.store(micros_since(epoch), Ordering::Relaxed);
        }
    }
}

fn micros_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// A live shared connection: its slot, and its users (the slot itself counted) when seen.
#[derive(Clone)]
struct Live {
    index: usize,
    client: Arc<Object>,
    users: usize,
}

#[derive(Default)]
struct Pick {
    best: Option<Live>,
    stalled: Option<Live>,
    empty: Option<usize>,
}

impl Reads {
    /// `shared` connections of `pool` carry the one-statement reads (with none, every read
    /// takes a connection of its own).
    pub fn new(pool: Pool, shared: usize) -> Self {
        Self {
            pool,
            slots: (0..shared).map(|_| Slot::default()).collect(),
            filling: tokio::sync::Mutex::new(()),
            epoch: Instant::now(),
            stall: STALL,
        }
    }

    /// The pool, for a caller that holds a connection across statements.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// A connection for one statement: an idle shared one; else a new one in an empty slot;
    /// else the shared one with the fewest statements waiting. When every shared one has
    /// stalled (or there are none), one of its own from the pool, or a stalled one if the
    /// pool has none free. A closed connection's slot is empty again (the connection goes
    /// back to the pool, which discards it, once its last statement is done).
    pub async fn client(&self) -> Result<Lease<'_>, ApiError> {
        loop {
            let Pick {
                best,
                stalled,
                empty,
            } = self.pick();
            let Some(index) = empty else {
                return match best {
                    Some(live) => Ok(self.lease(live)),
                    None => self.own_or_share(stalled).await,
                };
            };
            if let Some(live) = best.as_ref().filter(|live| live.users == 1) {
                return Ok(self.lease(live.clone()));
            }
            // One caller connects a slot at a time. The others share what there is, or take
            // a connection of their own meanwhile (so that a slow database makes no queue).
            let Ok(_filling) = self.filling.try_lock() else {
                return match best {
                    Some(live) => Ok(self.lease(live)),
                    None => self.own_or_share(stalled).await,
                };
            };
            if self.slot(index).is_some() {
                continue; // filled meanwhile
            }
            // With a connection to share, waiting for the pool (its exports may hold every
            // other connection) is no better than sharing at once.
            let mut timeouts = self.pool.timeouts();
            if best.is_some() || stalled.is_some() {
                timeouts.wait = Some(Duration::ZERO);
            }
            return match self.pool.timeout_get(&timeouts).await {
                Ok(object) => {
                    let client = Arc::new(object);
                    *self.slot(index) = Some(Arc::clone(&client));
                    Ok(self.lease(Live {
                        index,
                        client,
                        users: 1,
                    }))
                }
                Err(error) => best
                    .or(stalled)
                    .map(|live| self.lease(live))
                    .ok_or_else(|| ApiError::from(error)),
            };
        }
    }

    /// A connection of its own from the pool; if the pool has none free and there is a
    /// stalled shared one, that one rather than a wait.
    async fn own_or_share(&self, stalled: Option<Live>) -> Result<Lease<'_>, ApiError> {
        let mut timeouts = self.pool.timeouts();
        if stalled.is_some() {
            timeouts.wait = Some(Duration::ZERO);
        }
        match self.pool.timeout_get(&timeouts).await {
            Ok(object) => Ok(Lease {
                client: Arc::new(object),
                progress: None,
            }),
            Err(error) => stalled
                .map(|live| self.lease(live))
                .ok_or_else(|| ApiError::from(error)),
        }
    }

    /// The live shared connection with the fewest users that has not stalled, the stalled
    /// one with the fewest, and the first empty slot. Slots whose connection closed are
    /// emptied here.
    fn pick(&self) -> Pick {
        let now = micros_since(self.epoch);
        let stall = u64::try_from(self.stall.as_micros()).unwrap_or(u64::MAX);
        let mut pick = Pick::default();
        for (index, slot) in self.slots.iter().enumerate() {
            let mut client = self.slot(index);
            match client.as_ref() {
                Some(client) if !client.is_closed() => {
                    let users = Arc::strong_count(client);
                    let stalled = users > 1
                        && now.saturating_sub(slot.progress.load(Ordering::Relaxed)) > stall;
                    let fewest = if stalled {
                        &mut pick.stalled
                    } else {
                        &mut pick.best
                    };
                    if fewest.as_ref().is_none_or(|live| users < live.users) {
                        *fewest = Some(Live {
                            index,
                            client: Arc::clone(client),
                            users,
                        });
                    }
                }
                _ => {
                    *client = None;
                    pick.empty.get_or_insert(index);
                }
            }
        }
        pick
    }

    fn lease(&self, live: Live) -> Lease<'_> {
        let progress = &self.slots[live.index].progress;
        if live.users == 1 {
            // Idle until now: the wait for progress starts here.
            progress.store(micros_since(self.epoch), Ordering::Relaxed);
        }
        Lease {
            client: live.client,
            progress: Some((progress, self.epoch)),
        }
    }

    fn slot(&self, index: usize) -> std::sync::MutexGuard<'_, Option<Arc<Object>>> {
        self.slots[index]
            .client
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::{collections::HashSet, time::Instant};

    use fieldline_testkit::TestEnv;

    use super::*;

    fn reads(env: &TestEnv, size: usize, shared: usize) -> Reads {
        let mut config = env.config();
        config.database_pool_size = size;
        let settings = fieldline_common::db::DatabaseSettings::from_config(&config).unwrap();
        Reads::new(crate::query_pool(&config, &settings, size).unwrap(), shared)
    }

    /// For tests of sharing: a busy machine running tests side by side must not make a
    /// connection look stalled.
    fn patient(mut reads: Reads) -> Reads {
        reads.stall = Duration::from_secs(60);
        reads
    }

    async fn backend(reads: &Reads) -> i32 {
        let client = reads.client().await.unwrap();
        let row = client
            .query_one("SELECT pg_backend_pid(), pg_sleep(0.02)", &[])
            .await
            .unwrap();
        row.get(0)
    }

    /// The backends of `n` reads sent at once.
    async fn burst(reads: &Reads, n: usize) -> HashSet<i32> {
        futures::future::join_all((0..n).map(|_| backend(reads)))
            .await
            .into_iter()
            .collect()
    }

    /// A read sent once a statement of `seconds` has stalled its connection: its backend,
    /// and how long it took.
    async fn read_during_stall(reads: &Reads, seconds: f64) -> (i32, Duration) {
        let long = async {
            let client = reads.client().await.unwrap();
            client
                .execute("SELECT pg_sleep($1)", &[&seconds])
                .await
                .unwrap();
        };
        let after_the_stall = async {
            tokio::time::sleep(STALL * 2).await;
            let started = Instant::now();
            (backend(reads).await, started.elapsed())
        };
        tokio::join!(long, after_the_stall).1
    }

    #[tokio::test]
    async fn concurrent_statements_share_the_slots_and_leave_the_rest_of_the_pool() {
        let env = TestEnv::new().await;
        let reads = patient(reads(&env, 4, 2));
        // Connected first: a burst that finds no shared connection yet takes connections of
        // its own rather than queue behind the one connecting.
        let first = backend(&reads).await;
        let pids = burst(&reads, 20).await;
        // 20 statements at once ran on the two shared connections, both used.
        assert_eq!(pids.len(), 2, "{pids:?}");
        assert!(pids.contains(&first));
        assert_eq!(reads.pool().status().size, 2);
        // The rest of the pool still serves a caller that needs a connection to itself.
        let own = reads.pool().get().await.unwrap();
        let pid: i32 = own
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        assert!(!pids.contains(&pid));
        env.cleanup().await;
    }

    #[tokio::test]
    async fn a_closed_connection_is_replaced() {
        let env = TestEnv::new().await;
        let reads = patient(reads(&env, 4, 1));
        let first = backend(&reads).await;
        let held = reads.client().await.unwrap();
        let pg = env.pg().await;
        pg.execute("SELECT pg_terminate_backend($1)", &[&first])
            .await
            .unwrap();
        // The connection notices once it reads the server's goodbye.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !held.is_closed() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(held.is_closed());
        let second = backend(&reads).await;
        assert_ne!(first, second);
        env.cleanup().await;
    }

    #[tokio::test]
    async fn a_read_goes_around_a_shared_connection_stalled_behind_a_long_statement() {
        let env = TestEnv::new().await;
        let reads = reads(&env, 3, 1);
        let shared = backend(&reads).await;
        let (pid, took) = read_during_stall(&reads, 1.5).await;
        // Not queued behind the long statement: a connection of its own, at once.
        assert_ne!(pid, shared);
        assert!(took < Duration::from_millis(800), "{took:?}");
        // Once the long statement is done, reads share the one connection again.
        let pids = burst(&reads, 4).await;
        assert_eq!(pids, HashSet::from([shared]));
        env.cleanup().await;
    }

    #[tokio::test]
    async fn with_the_pool_held_elsewhere_a_stalled_connection_is_still_shared() {
        let env = TestEnv::new().await;
        let reads = reads(&env, 2, 1);
        let shared = backend(&reads).await;
        let _export = reads.pool().get().await.unwrap();
        let (pid, took) = read_during_stall(&reads, 0.5).await;
        // Behind the long statement rather than 5 s in the pool's queue and an error.
        assert_eq!(pid, shared);
        assert!(took < Duration::from_secs(2), "{took:?}");
        env.cleanup().await;
    }

    #[tokio::test]
    async fn with_no_shared_connections_each_read_has_its_own() {
        let env = TestEnv::new().await;
        let reads = reads(&env, 2, 0);
        let pids = burst(&reads, 2).await;
        assert_eq!(pids.len(), 2);
        // Nothing is kept back: the whole pool is free again.
        assert_eq!(reads.pool().status().available, 2);
        env.cleanup().await;
    }

    #[tokio::test]
    async fn a_connection_idle_for_long_is_not_taken_for_stalled() {
        let env = TestEnv::new().await;
        let reads = reads(&env, 3, 1);
        let first = backend(&reads).await;
        tokio::time::sleep(STALL * 2).await;
        let pids = burst(&reads, 4).await;
        assert_eq!(pids, HashSet::from([first]));
        env.cleanup().await;
    }

    #[tokio::test]
    async fn with_the_pool_held_elsewhere_reads_share_at_once() {
        let env = TestEnv::new().await;
        let reads = patient(reads(&env, 2, 2));
        let first = backend(&reads).await;
        // An export holds the pool's other connection; the empty slot cannot be filled.
        let _export = reads.pool().get().await.unwrap();
        let started = Instant::now();
        let pids = burst(&reads, 4).await;
        assert_eq!(pids, HashSet::from([first]));
        // Far below the 60 s a read would stall waiting for the held connection.
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
        env.cleanup().await;
    }
}
