//! IndexService: parse, call the catalog, convert back.

use std::sync::Arc;

use tonic::{Request, Response, Status, Streaming};

use super::convert::{self, name, next_page, page_after, page_size};
use super::status::ErrorCode;
use super::Core;
use crate::error::Error;
use crate::model::{NewIndex, Profile, SearchParams};
use crate::pb;
use crate::pb::index_service_server::IndexService;

pub struct IndexApi {
    core: Arc<Core>,
}

impl IndexApi {
    pub fn new(core: Arc<Core>) -> Self {
        IndexApi { core }
    }
}

type R<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl IndexService for IndexApi {
    #[tracing::instrument(skip_all, fields(index = %req.get_ref().name))]
    async fn create_index(
        &self,
        req: Request<pb::CreateIndexRequest>,
    ) -> R<pb::CreateIndexResponse> {
        let new = NewIndex::try_from(req.into_inner())?;
        let view = self.core.app()?.create_index(new).await?;
        Ok(Response::new(pb::CreateIndexResponse {
            index: Some(view.into()),
        }))
    }

    async fn get_index(&self, req: Request<pb::GetIndexRequest>) -> R<pb::GetIndexResponse> {
        let n = name("name", &req.get_ref().name)?;
        let ready = self.core.app()?;
        let mut index: pb::Index = ready.catalog.get_index(&n)?.into();
        if let Some((policy, status)) = ready.refresh.get(&n) {
            index.refresh_policy = Some(convert::refresh_policy_to(&policy));
            index.refresh_status = Some(convert::refresh_status_to(&status));
        }
        if let Some(c) = &ready.cluster {
            let (desired, nodes) = c.index_nodes(&n).await;
            index.desired_generation = desired;
            index.nodes = nodes.iter().map(convert::node_generation_to).collect();
        }
        Ok(Response::new(pb::GetIndexResponse { index: Some(index) }))
    }

    async fn list_indexes(
        &self,
        req: Request<pb::ListIndexesRequest>,
    ) -> R<pb::ListIndexesResponse> {
        let req = req.into_inner();
        let limit = page_size(req.page_size)?;
        let after = page_after(&req.page_token)?;
        let mut views = self.core.catalog()?.list_indexes(after.as_ref(), limit + 1);
        let next_page_token = next_page(&mut views, limit, |v| v.meta.name.to_string());
        Ok(Response::new(pb::ListIndexesResponse {
            indexes: views.into_iter().map(Into::into).collect(),
            next_page_token,
        }))
    }

    #[tracing::instrument(skip_all, fields(index = %req.get_ref().name))]
    async fn delete_index(
        &self,
        req: Request<pb::DeleteIndexRequest>,
    ) -> R<pb::DeleteIndexResponse> {
        let n = name("name", &req.get_ref().name)?;
        self.core.app()?.delete_index(&n).await?;
        Ok(Response::new(pb::DeleteIndexResponse {}))
    }

    #[tracing::instrument(skip_all, fields(index = %req.get_ref().index_name, points = req.get_ref().points.len()))]
    async fn upsert_points(
        &self,
        req: Request<pb::UpsertPointsRequest>,
    ) -> R<pb::UpsertPointsResponse> {
        let req = req.into_inner();
        let n = name("index_name", &req.index_name)?;
        self.core.check_points("the request", req.points.len())?;
        let request_id = convert::request_id(&req.request_id)?;
        let w = self
            .core
            .app()?
            .upsert(&n, convert::points(req.points), request_id)
            .await?;
        Ok(Response::new(pb::UpsertPointsResponse {
            upserted_count: w.affected,
            point_count: w.point_count,
            sequence: w.sequence,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn import_points(
        &self,
        req: Request<Streaming<pb::ImportPointsRequest>>,
    ) -> R<pb::ImportPointsResponse> {
        let mut stream = req.into_inner();
        let mut index = None;
        let mut upserted_total = 0u64;
        let mut point_count = 0u64;
        let mut messages = 0u64;
        let mut request_id = String::new();
        let mut sequence = 0u64;
        loop {
            let msg = match stream.message().await {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(status) => {
                    let e = if status.code() == tonic::Code::OutOfRange {
                        Error::Limit(format!(
                            "message {} of the stream is too large ({}); {upserted_total} points were upserted before it",
                            messages + 1,
                            status.message()
                        ))
                    } else {
                        return Err(Status::new(
                            status.code(),
                            format!(
                                "{}; {upserted_total} points were upserted before it",
                                status.message()
                            ),
                        ));
                    };
                    return Err(e.into());
                }
            };
            messages += 1;
            if index.is_none() {
                index = Some(name("index_name (of the first message)", &msg.index_name)?);
                request_id = convert::request_id(&msg.request_id)?.to_string();
            }
            let Some(n) = index.as_ref() else { continue };
            if msg.points.is_empty() {
                continue;
            }
            if let Err(e) = self.core.check_points(
                &format!("message {messages} of the stream"),
                msg.points.len(),
            ) {
                return Err(Status::new(
                    e.code(),
                    format!("{e}; {upserted_total} points were upserted before it"),
                ));
            }
            // Message n of a stream with a request_id is logged as "<request_id>/<n>".
            let id = if request_id.is_empty() {
                String::new()
            } else {
                format!("{request_id}/{messages}")
            };
            match self
                .core
                .app()?
                .import_message(n, convert::points(msg.points), &id)
                .await
            {
                Ok(w) => {
                    upserted_total += w.affected;
                    point_count = w.point_count;
                    sequence = w.sequence;
                }
                Err(e) => {
                    let code = e.code();
                    return Err(Status::new(
                        code,
                        format!(
                            "message {messages} of the stream: {e}; {upserted_total} points were upserted before it"
                        ),
                    ));
                }
            }
        }
        let Some(n) = index else {
            return Err(Error::invalid(
                "the stream had no message: the first must name index_name",
            )
            .into());
        };
        if sequence > 0 || (messages > 0 && upserted_total == 0) {
            point_count = self.core.app()?.import_ended(&n, sequence).await?;
        }
        tracing::info!(index = %n, upserted = upserted_total, messages, "import finished");
        if upserted_total > 0 {
            // A bulk load is when a snapshot pays: a restart then loads instead of replaying.
            self.core.catalog()?.import_ended(&n);
        }
        Ok(Response::new(pb::ImportPointsResponse {
            upserted_count: upserted_total,
            point_count,
            sequence,
        }))
    }

    #[tracing::instrument(skip_all, fields(index = %req.get_ref().index_name))]
    async fn delete_points(
        &self,
        req: Request<pb::DeletePointsRequest>,
    ) -> R<pb::DeletePointsResponse> {
        let req = req.into_inner();
        let n = name("index_name", &req.index_name)?;
        self.core.check_delete_ids(req.ids.len())?;
        let request_id = convert::request_id(&req.request_id)?;
        let w = self
            .core
            .app()?
            .delete_points(&n, req.ids, request_id)
            .await?;
        Ok(Response::new(pb::DeletePointsResponse {
            deleted_count: w.affected,
            point_count: w.point_count,
            sequence: w.sequence,
        }))
    }

    async fn search(&self, req: Request<pb::SearchRequest>) -> R<pb::SearchResponse> {
        let deadline = convert::grpc_timeout(req.metadata());
        let req = req.into_inner();
        let n = name("index_name", &req.index_name)?;
        let params = SearchParams::parse(req.k, req.ef_search)?;
        self.core
            .app()?
            .wait_applied(&n, req.min_sequence, deadline)
            .await?;
        let (hits, generation) = self.core.catalog()?.search(&n, req.vector, &params).await?;
        Ok(Response::new(pb::SearchResponse {
            neighbors: convert::neighbors(hits),
            generation,
        }))
    }

    async fn get_point(&self, req: Request<pb::GetPointRequest>) -> R<pb::GetPointResponse> {
        let req = req.into_inner();
        let n = name("index_name", &req.index_name)?;
        let vector = self.core.catalog()?.get_point(&n, req.id).await?;
        Ok(Response::new(pb::GetPointResponse {
            point: Some(pb::Point { id: req.id, vector }),
        }))
    }

    async fn search_batch(
        &self,
        req: Request<pb::SearchBatchRequest>,
    ) -> R<pb::SearchBatchResponse> {
        let deadline = convert::grpc_timeout(req.metadata());
        let req = req.into_inner();
        let n = name("index_name", &req.index_name)?;
        let params = SearchParams::parse(req.k, req.ef_search)?;
        self.core.check_batch(req.queries.len(), req.k as usize)?;
        self.core
            .app()?
            .wait_applied(&n, req.min_sequence, deadline)
            .await?;
        let queries = req.queries.into_iter().map(|q| q.vector).collect();
        let (results, generation) = self
            .core
            .catalog()?
            .search_batch(&n, queries, &params)
            .await?;
        Ok(Response::new(pb::SearchBatchResponse {
            results: results
                .into_iter()
                .map(|h| pb::SearchResult {
                    neighbors: convert::neighbors(h),
                })
                .collect(),
            generation,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn put_profile(&self, req: Request<pb::PutProfileRequest>) -> R<pb::PutProfileResponse> {
        let p = req
            .into_inner()
            .profile
            .ok_or_else(|| Error::invalid("profile is required"))?;
        let profile = Profile::try_from(p)?;
        let saved = self.core.app()?.put_profile(profile).await?;
        Ok(Response::new(pb::PutProfileResponse {
            profile: Some(saved.into()),
        }))
    }

    async fn get_profile(&self, req: Request<pb::GetProfileRequest>) -> R<pb::GetProfileResponse> {
        let n = name("name", &req.get_ref().name)?;
        Ok(Response::new(pb::GetProfileResponse {
            profile: Some(self.core.app()?.get_profile(&n).await?.into()),
        }))
    }

    async fn list_profiles(
        &self,
        req: Request<pb::ListProfilesRequest>,
    ) -> R<pb::ListProfilesResponse> {
        let req = req.into_inner();
        let limit = page_size(req.page_size)?;
        let after = page_after(&req.page_token)?;
        let mut profiles = self
            .core
            .app()?
            .list_profiles(after.as_ref(), limit + 1)
            .await?;
        let next_page_token = next_page(&mut profiles, limit, |p| p.name.to_string());
        Ok(Response::new(pb::ListProfilesResponse {
            profiles: profiles.into_iter().map(Into::into).collect(),
            next_page_token,
        }))
    }

    async fn delete_profile(
        &self,
        req: Request<pb::DeleteProfileRequest>,
    ) -> R<pb::DeleteProfileResponse> {
        let n = name("name", &req.get_ref().name)?;
        self.core.app()?.delete_profile(&n).await?;
        Ok(Response::new(pb::DeleteProfileResponse {}))
    }

    #[tracing::instrument(skip_all, fields(profile = %req.get_ref().name))]
    async fn activate_profile(
        &self,
        req: Request<pb::ActivateProfileRequest>,
    ) -> R<pb::ActivateProfileResponse> {
        let n = name("name", &req.get_ref().name)?;
        let deadline = convert::grpc_timeout(req.metadata());
        let done = self.core.app()?.activate_profile(&n, deadline).await?;
        Ok(Response::new(pb::ActivateProfileResponse {
            generations: done
                .generations
                .iter()
                .map(|(index, g)| convert::generation_to(index, g))
                .collect(),
            rolled_out: done.rolled_out,
            nodes: done.nodes.iter().map(convert::node_generation_to).collect(),
        }))
    }
}
