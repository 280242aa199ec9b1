//! Search and SearchBatch on the active generation, and GetPoint.

use super::*;

/// Queries of a SearchBatch between two checks of its cancellation flag.
const BATCH_CHUNK: usize = 64;

impl Catalog {
    /// One stored point's vector, or NOT_FOUND.
    pub async fn get_point(&self, name: &Name, id: u64) -> Result<Vec<f32>> {
        let handle = self.handle(name)?;
        let store = self.store.clone();
        let uid = handle.meta.uid;
        tokio::task::spawn_blocking(move || store.get_point(uid, id))
            .await??
            .ok_or_else(|| Error::not_found("point", format!("{id} in index {name}")))
    }

    /// The k nearest points to one vector on the active generation, with its number (on the
    /// blocking pool, one search per core at a time).
    pub async fn search(
        &self,
        name: &Name,
        mut vector: Vec<f32>,
        params: &SearchParams,
    ) -> Result<(Vec<Hit>, u64)> {
        let handle = self.handle(name)?;
        handle.prepare_vector("vector", &mut vector)?;
        let gen = handle.active();
        let ef = params
            .ef_search
            .unwrap_or(gen.meta.config.ef_search as usize);
        let k = params.k;
        let number = gen.meta.number;
        let permit = self.search_permit().await?;
        let hits = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            gen.search(&vector, k, ef)
        })
        .await?;
        Ok((hits, number))
    }

    async fn search_permit(&self) -> Result<tokio::sync::OwnedSemaphorePermit> {
        self.search_permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Error::Internal("the search semaphore is closed".into()))
    }

    /// The k nearest points to each query, all on one generation, on the blocking pool (and
    /// every core). The work stops between chunks of queries once this future is dropped
    /// (the caller went away or its deadline passed: tonic drops the handler's future).
    pub async fn search_batch(
        &self,
        name: &Name,
        mut queries: Vec<Vec<f32>>,
        params: &SearchParams,
    ) -> Result<(Vec<Vec<Hit>>, u64)> {
        if queries.is_empty() {
            return Err(Error::invalid("queries is empty: send at least one query"));
        }
        let handle = self.handle(name)?;
        for (i, q) in queries.iter_mut().enumerate() {
            handle.prepare_vector(&format!("queries[{i}]"), q)?;
        }
        let gen = handle.active();
        let ef = params
            .ef_search
            .unwrap_or(gen.meta.config.ef_search as usize);
        let k = params.k;
        let number = gen.meta.number;
        let cancel = CancelOnDrop::default();
        let flag = cancel.0.clone();
        let permit = self.search_permit().await?;
        let results = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let mut out = Vec::with_capacity(queries.len());
            for chunk in queries.chunks(BATCH_CHUNK) {
                if flag.load(Ordering::Acquire) {
                    return None;
                }
                out.extend(
                    chunk
                        .par_iter()
                        .map(|q| gen.search(q, k, ef))
                        .collect::<Vec<_>>(),
                );
            }
            Some(out)
        })
        .await?;
        drop(cancel);
        let results = results.ok_or_else(|| Error::Cancelled("the batch was cancelled".into()))?;
        Ok((results, number))
    }
}

/// Sets its flag when dropped: the blocking half of a call sees that the call was abandoned.
#[derive(Default)]
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}
