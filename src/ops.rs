//! Operations shared by the gRPC API and the admin HTTP server: reading
//! sagas with their definitions, and the operator actions.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::api::ApiError;
use crate::domain::{
    assume_unrecorded, decide, Definition, Fact, Saga, SagaId, SagaState, ValidationError,
};
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

/// How long "the latest version of a definition" is taken from the cache.
/// A version registered through another coordinator is seen after at most
/// this long; one registered through this one at once.
const LATEST_TTL: Duration = Duration::from_secs(1);

type LatestCache = Arc<Mutex<HashMap<String, (Instant, Arc<Definition>)>>>;

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
    /// Latest version per definition name.
    pub latest: LatestCache,
}

impl Ops {
    /// Reads and operator actions over `store`.
    pub fn new(
        store: Arc<dyn SagaStore>,
        worker: Arc<Worker>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Self {
        Ops {
            store,
            worker,
            metrics,
            latest: Arc::default(),
        }
    }

    /// A definition by name and version (`None` = latest), from the caches
    /// where possible: versions never change, and "latest" is re-read after
    /// `LATEST_TTL`.
    pub async fn definition_for_start(
        &self,
        name: &str,
        version: Option<u32>,
    ) -> Result<Option<Arc<Definition>>, ApiError> {
        if let Some(v) = version {
            return Ok(self.worker.definition(name, v).await?);
        }
        if let Some((at, d)) = lock(&self.latest).get(name) {
            if at.elapsed() < LATEST_TTL {
                return Ok(Some(d.clone()));
            }
        }
        let Some((def, _)) = self.store.definition_get(name, None).await? else {
            return Ok(None);
        };
        let def = Arc::new(def);
        self.remember_latest(def.clone());
        Ok(Some(def))
    }

    /// Records `def` as the latest version of its name (after registering).
    pub fn remember_latest(&self, def: Arc<Definition>) {
        lock(&self.latest).insert(def.name.clone(), (Instant::now(), def));
    }

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
            // A saga with an owner (driving it now, or gone without giving it
            // back) may be further on than its record shows.
            let mut saga = rec.saga.clone();
            if rec.owner.is_some() {
                assume_unrecorded(&mut saga, &def);
            }
            let decision = decide(&saga, &def, fact, self.worker.db_now(), rand::random())?;
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
