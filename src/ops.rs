//! Operations shared by the gRPC API and the admin HTTP server: reading
//! sagas with their definitions, and the operator actions.

use std::sync::Arc;

use crate::api::ApiError;
use crate::domain::{decide, Definition, Fact, Saga, SagaId, SagaState, ValidationError};
use crate::store::{SagaRecord, SagaStore, StoreError};
use crate::worker::Worker;

/// Longest operator note or actor accepted (bytes).
pub const NOTE_BYTES_MAX: usize = 2_048;
/// Most attempts of an operator action against a saga that keeps changing.
const OPERATOR_TRIES_MAX: usize = 5;

/// An operator action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OperatorKind {
    /// Resume a suspended saga, or hurry a waiting retry.
    Retry,
    /// Force compensation (before the pivot).
    Abort,
    /// Mark a suspended saga resolved by hand.
    Resolve,
}

impl OperatorKind {
    /// Parses `retry`, `abort` or `resolve`.
    pub fn parse(s: &str) -> Option<OperatorKind> {
        match s {
            "retry" => Some(OperatorKind::Retry),
            "abort" => Some(OperatorKind::Abort),
            "resolve" => Some(OperatorKind::Resolve),
            _ => None,
        }
    }

    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            OperatorKind::Retry => "retry",
            OperatorKind::Abort => "abort",
            OperatorKind::Resolve => "resolve",
        }
    }
}

/// Reads and operator actions over the store, with the worker's definition
/// cache and clock.
#[derive(Clone)]
pub struct Ops {
    /// The store.
    pub store: Arc<dyn SagaStore>,
    /// The worker (definition cache, database clock).
    pub worker: Arc<Worker>,
    /// Counts operator resolutions.
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl Ops {
    /// A definition version, or NOT_FOUND.
    pub async fn definition(&self, name: &str, version: u32) -> Result<Arc<Definition>, ApiError> {
        self.worker
            .definition(name, version)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("definition {name}@{version} not found")))
    }

    /// A saga, or NOT_FOUND.
    pub async fn record(&self, id: SagaId) -> Result<SagaRecord, ApiError> {
        self.store
            .saga_get(id)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("saga {id} not found")))
    }

    /// Applies an operator action with optimistic concurrency: read, decide,
    /// write if nothing changed meanwhile, else read again. Returns the saga
    /// as it stands afterwards.
    pub async fn operator(
        &self,
        id: SagaId,
        kind: OperatorKind,
        actor: &str,
        note: &str,
    ) -> Result<(Saga, Arc<Definition>), ApiError> {
        if note.len() > NOTE_BYTES_MAX {
            return Err(ValidationError::new(
                "note",
                format!("longer than {NOTE_BYTES_MAX} bytes"),
            )
            .into());
        }
        if kind == OperatorKind::Resolve && note.trim().is_empty() {
            return Err(ValidationError::new(
                "note",
                "required: say why the saga is resolved by hand",
            )
            .into());
        }
        for _ in 0..OPERATOR_TRIES_MAX {
            let rec = self.record(id).await?;
            let def = self
                .definition(&rec.saga.definition, rec.saga.version)
                .await?;
            let (actor, note) = (actor.to_owned(), note.to_owned());
            let fact = match kind {
                OperatorKind::Retry => Fact::OperatorRetry { actor, note },
                OperatorKind::Abort => Fact::OperatorAbort { actor, note },
                OperatorKind::Resolve => Fact::OperatorResolve { actor, note },
            };
            let decision = decide(&rec.saga, &def, fact, self.worker.db_now(), rand::random())?;
            let settled = decision.settled_now(rec.saga.state);
            // "Retry now" of a saga a coordinator is driving has nothing to
            // hurry and must not fence out its call in flight.
            let require_unleased =
                kind == OperatorKind::Retry && rec.saga.state != SagaState::Suspended;
            match self
                .store
                .saga_operator_save(&rec, &decision, settled, require_unleased)
                .await
            {
                Ok(()) => {
                    if settled {
                        self.metrics.saga_settled(decision.saga.state);
                    }
                    return Ok((self.record(id).await?.saga, def));
                }
                Err(StoreError::Conflict) => continue,
                Err(StoreError::Busy) => return Err(ApiError::FailedPrecondition(
                    "saga is being driven by a coordinator right now: nothing is waiting to retry"
                        .into(),
                )),
                Err(e) => return Err(e.into()),
            }
        }
        Err(ApiError::Aborted(format!(
            "saga {id} kept changing; try again"
        )))
    }
}
