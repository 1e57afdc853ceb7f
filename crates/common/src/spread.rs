//! CPU-bound work of one request or transaction spread over the cores, its results kept in
//! order: an import is one long piece of work at each step (ingest-http's parse and encoding,
//! the writer's decoding and blocks), and while it runs the other cores would otherwise idle.

/// `f` of every item, in the items' order, on up to `threads` threads: each thread takes a
/// contiguous share of about equal `weight`. Runs inline on one thread (no thread started)
/// when `threads` < 2 or there is one item.
pub fn map_in_order<T, R, W, F>(items: Vec<T>, threads: usize, weight: W, f: F) -> Vec<R>
where
    T: Send,
    R: Send,
    W: Fn(&T) -> usize,
    F: Fn(T) -> R + Sync,
{
    let threads = threads.min(items.len());
    if threads < 2 {
        return items.into_iter().map(f).collect();
    }
    let total: usize = items.iter().map(&weight).sum();
    let mut shares: Vec<Vec<T>> = Vec::with_capacity(threads);
    let mut share = Vec::new();
    let mut taken = 0;
    for item in items {
        taken += weight(&item);
        share.push(item);
        if taken * threads >= total * (shares.len() + 1) && shares.len() + 1 < threads {
            shares.push(std::mem::take(&mut share));
        }
    }
    shares.push(share);
    let f = &f;
    std::thread::scope(|scope| {
        let handles: Vec<_> = shares
            .into_iter()
            .map(|share| scope.spawn(move || share.into_iter().map(f).collect::<Vec<R>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|handle| {
                handle
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    })
}

/// The threads this machine gives one piece of work: its cores, at most 4. Asked of the
/// system once (it reads the cgroup's quota files), not once a request.
pub fn threads() -> usize {
    static THREADS: std::sync::LazyLock<usize> = std::sync::LazyLock::new(|| {
        std::thread::available_parallelism()
            .map_or(1, usize::from)
            .min(4)
    });
    *THREADS
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    proptest! {
        /// Whatever the weights and the threads, every item is mapped once, in order.
        #[test]
        fn items_come_back_mapped_once_in_order(
            weights in proptest::collection::vec(0usize..1000, 0..60),
            threads in 0usize..6,
        ) {
            let items: Vec<(usize, usize)> = weights.into_iter().enumerate().collect();
            let mapped = super::map_in_order(items.clone(), threads, |(_, w)| *w, |(i, w)| (i * 2, w));
            let expected: Vec<(usize, usize)> = items.iter().map(|(i, w)| (i * 2, *w)).collect();
            prop_assert_eq!(mapped, expected);
        }
    }
}
