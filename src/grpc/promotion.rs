//! PromotionService: parse, call the registry, convert back.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert::{name, text, MAX_NOTE_BYTES, MAX_WHO_BYTES};
use super::Core;
use crate::pb;
use crate::pb::promotion_service_server::PromotionService;

pub struct PromotionApi {
    core: Arc<Core>,
}

impl PromotionApi {
    pub fn new(core: Arc<Core>) -> Self {
        PromotionApi { core }
    }
}

type R<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl PromotionService for PromotionApi {
    #[tracing::instrument(skip_all, fields(index = %req.get_ref().index_name, trial = req.get_ref().trial_id))]
    async fn promote(&self, req: Request<pb::PromoteRequest>) -> R<pb::PromoteResponse> {
        let req = req.into_inner();
        let index = name("index_name", &req.index_name)?;
        let promoted_by = text("promoted_by", &req.promoted_by, MAX_WHO_BYTES)?;
        let note = text("note", &req.note, MAX_NOTE_BYTES)?;
        self.core.catalog()?.handle(&index)?;
        let (current, history_depth) = self
            .core
            .catalog()?
            .registry()
            .promote(&index, req.trial_id, promoted_by, note)
            .await?;
        Ok(Response::new(pb::PromoteResponse {
            current: Some(current.into()),
            history_depth,
        }))
    }

    #[tracing::instrument(skip_all, fields(index = %req.get_ref().index_name))]
    async fn rollback(&self, req: Request<pb::RollbackRequest>) -> R<pb::RollbackResponse> {
        let index = name("index_name", &req.get_ref().index_name)?;
        self.core.catalog()?.handle(&index)?;
        let (current, history_depth) = self.core.catalog()?.registry().rollback(&index).await?;
        Ok(Response::new(pb::RollbackResponse {
            current: current.map(Into::into),
            history_depth,
        }))
    }

    async fn get_promoted(
        &self,
        req: Request<pb::GetPromotedRequest>,
    ) -> R<pb::GetPromotedResponse> {
        let index = name("index_name", &req.get_ref().index_name)?;
        self.core.catalog()?.handle(&index)?;
        let (current, history) = self.core.catalog()?.registry().get(&index).await?;
        Ok(Response::new(pb::GetPromotedResponse {
            current: current.map(Into::into),
            history: history.into_iter().map(Into::into).collect(),
        }))
    }
}
