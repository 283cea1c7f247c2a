//! Running a step on rayon's worker threads.

/// Runs `f` on a worker thread of the current rayon pool (inline when already on one) and
/// returns its result.
///
/// kron's kernels split large work with rayon. Called from a thread outside the pool, each
/// kernel hands its work to the pool and sleeps until it is done: two thread handoffs per
/// kernel, dozens per step (about 5% of a conv net's forward and backward pass on 2 cores).
/// Called from a worker, a kernel splits its work from where it runs. `train_step` and
/// `predict` run this way; wrap the body of a loop of your own likewise, building the tape
/// inside `f` (a tape stays on one thread). The results are the same bits either way.
pub fn in_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let mut out = None;
    rayon::scope(|_| out = Some(f()));
    out.expect("rayon::scope runs its closure before returning")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_pool_runs_on_a_worker_and_returns_the_result() {
        assert_eq!(rayon::current_thread_index(), None);
        let (on_worker, v) = in_pool(|| (rayon::current_thread_index().is_some(), 6 * 7));
        assert!(on_worker);
        assert_eq!(v, 42);
        // Nested: inline on the same worker.
        let same = in_pool(|| {
            let outer = rayon::current_thread_index();
            in_pool(rayon::current_thread_index) == outer
        });
        assert!(same);
    }
}
