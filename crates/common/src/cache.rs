//! A read-through cache that broadcast invalidation can trust.

use std::{
    collections::HashMap,
    future::Future,
    hash::Hash,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

/// A moka cache whose `invalidate_all` wins over loads in flight: a value loaded across an
/// invalidation (a key revoked while its verification was on the wire) is returned to its
/// caller but not kept, even if the invalidation lands during the insert itself.
///
/// Callers that miss on the same key at once share one load: the first loads, the others wait
/// for it and take what it kept (or load in turn when it kept nothing). A thousand devices
/// that connect together, twenty messages in flight each, cost a thousand lookups, not twenty
/// thousand.
pub struct InvalidatingCache<K, V> {
    // The sync flavour: a hit is a plain call, no future to poll or to hold in the caller's.
    cache: moka::sync::Cache<K, V>,
    generation: Arc<AtomicU64>,
    /// One gate per key being loaded, held by the caller whose load is in flight.
    loading: Arc<Mutex<HashMap<K, Arc<tokio::sync::Mutex<()>>>>>,
}

impl<K, V> Clone for InvalidatingCache<K, V> {
    fn clone(&self) -> Self {
        Self {
            cache: self.cache.clone(),
            generation: self.generation.clone(),
            loading: self.loading.clone(),
        }
    }
}

/// A caller's place at a key's gate; the last to leave takes the gate away (also when its
/// future is dropped while waiting).
struct Queued<'a, K: Hash + Eq> {
    loading: &'a Mutex<HashMap<K, Arc<tokio::sync::Mutex<()>>>>,
    key: &'a K,
    gate: Arc<tokio::sync::Mutex<()>>,
}

impl<'a, K: Hash + Eq + Clone> Queued<'a, K> {
    fn join(loading: &'a Mutex<HashMap<K, Arc<tokio::sync::Mutex<()>>>>, key: &'a K) -> Self {
        let gate = loading
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .entry(key.clone())
            .or_default()
            .clone();
        Self { loading, key, gate }
    }
}

impl<K: Hash + Eq> Drop for Queued<'_, K> {
    fn drop(&mut self) {
        let mut loading = self
            .loading
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // The map's and this caller's: nobody else waits at this gate (they join under the
        // same lock).
        if Arc::strong_count(&self.gate) == 2 {
            loading.remove(self.key);
        }
    }
}

impl<K, V> InvalidatingCache<K, V>
where
    K: Hash + Eq + Send + Sync + Clone + 'static,
    V: Clone + Send + Sync + 'static,
{
    pub fn new(capacity: u64, ttl: Duration) -> Self {
        Self {
            cache: moka::sync::Cache::builder()
                .max_capacity(capacity)
                .time_to_live(ttl)
                .support_invalidation_closures()
                .build(),
            generation: Arc::default(),
            loading: Arc::default(),
        }
    }

    /// The cached value, or the one `load` makes, kept unless an invalidation crossed the
    /// load. Errors are not cached.
    pub async fn get_or_load<E, L, F>(&self, key: K, load: L) -> Result<V, E>
    where
        L: FnOnce() -> F,
        F: Future<Output = Result<V, E>>,
    {
        if let Some(value) = self.cache.get(&key) {
            return Ok(value);
        }
        // The load is made and boxed only on a miss, so that a hit's future stays small (one
        // is held per message in flight in ingest-mqtt).
        Box::pin(self.load_once(key, load)).await
    }

    /// Waits for any load of `key` in flight, then takes what it kept, or loads.
    async fn load_once<E, L, F>(&self, key: K, load: L) -> Result<V, E>
    where
        L: FnOnce() -> F,
        F: Future<Output = Result<V, E>>,
    {
        let queued = Queued::join(&self.loading, &key);
        let _turn = queued.gate.lock().await;
        if let Some(value) = self.cache.get(&key) {
            return Ok(value);
        }
        self.load_and_keep(key.clone(), load()).await
    }

    async fn load_and_keep<E, F>(&self, key: K, load: F) -> Result<V, E>
    where
        F: Future<Output = Result<V, E>>,
    {
        let generation = self.generation.load(Ordering::SeqCst);
        let value = load.await?;
        if self.generation.load(Ordering::SeqCst) == generation {
            self.cache.insert(key.clone(), value.clone());
            if self.generation.load(Ordering::SeqCst) != generation {
                self.cache.invalidate(&key);
            }
        }
        Ok(value)
    }

    /// The cached value, if any, without loading it.
    pub fn get(&self, key: &K) -> Option<V> {
        self.cache.get(key)
    }

    pub fn invalidate(&self, key: &K) {
        self.cache.invalidate(key);
    }

    pub fn invalidate_all(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.cache.invalidate_all();
    }

    /// Drops the entries `matches` selects, and keeps no value of a load in flight (its key
    /// may be one of them).
    pub fn invalidate_if(&self, matches: impl Fn(&K, &V) -> bool + Send + Sync + 'static) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        if self.cache.invalidate_entries_if(matches).is_err() {
            self.cache.invalidate_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lookup_future_does_not_carry_its_load() {
        let cache: InvalidatingCache<u8, u8> = InvalidatingCache::new(10, Duration::from_secs(60));
        let lookup = cache.get_or_load(1, || async {
            let large = [0u8; 4096];
            tokio::task::yield_now().await;
            Ok::<_, ()>(large[0])
        });
        // ingest-mqtt holds one such future per message in flight (thousands under load).
        assert!(
            std::mem::size_of_val(&lookup) < 512,
            "{} bytes",
            std::mem::size_of_val(&lookup)
        );
    }

    #[tokio::test]
    async fn callers_that_miss_together_share_one_load() {
        let cache: InvalidatingCache<u8, u8> = InvalidatingCache::new(10, Duration::from_secs(60));
        let loads = AtomicU64::new(0);
        let load = || async {
            loads.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok::<_, ()>(5)
        };
        let answers = futures::future::join_all((0..50).map(|_| cache.get_or_load(1, load))).await;
        assert!(answers.iter().all(|answer| *answer == Ok(5)));
        assert_eq!(loads.load(Ordering::SeqCst), 1, "one load for 50 callers");
        assert!(cache.loading.lock().unwrap().is_empty(), "gate left behind");

        // A failed load is not shared: the next caller in line loads again.
        let attempts = AtomicU64::new(0);
        let flaky = || async {
            let attempt = attempts.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(5)).await;
            if attempt == 0 { Err(()) } else { Ok(6) }
        };
        let answers = futures::future::join_all((0..10).map(|_| cache.get_or_load(2, flaky))).await;
        assert_eq!(answers[0], Err(()));
        assert!(answers[1..].iter().all(|answer| *answer == Ok(6)));
        assert_eq!(attempts.load(Ordering::SeqCst), 2);

        // A caller dropped while it waits leaves no gate behind.
        let waiting = cache.get_or_load(3, || async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok::<_, ()>(0)
        });
        assert!(
            tokio::time::timeout(Duration::from_millis(10), waiting)
                .await
                .is_err()
        );
        assert!(cache.loading.lock().unwrap().is_empty(), "gate left behind");
    }

    #[tokio::test]
    async fn a_load_crossed_by_an_invalidation_is_not_kept() {
        let cache: InvalidatingCache<u8, u8> = InvalidatingCache::new(10, Duration::from_secs(60));
        let crossed = cache.get_or_load(1, || async {
            cache.invalidate_all();
            Ok::<_, ()>(7)
        });
        assert_eq!(crossed.await, Ok(7));
        assert_eq!(
            cache.get_or_load(1, || async { Ok::<_, ()>(8) }).await,
            Ok(8),
            "stale value kept"
        );
        assert_eq!(
            cache.get_or_load(1, || async { Ok::<_, ()>(9) }).await,
            Ok(8),
            "fresh value not kept"
        );
    }
}
