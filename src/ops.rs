//! Operations shared by the gRPC API and the admin HTTP server: reading
//! sagas with their definitions, the operator actions, list paging, and the
//! error type both edges map ([`OpsError`]).
//!
//! ```text
//!   gRPC (api/status.rs) ──┐                   ┌── StoreError
//!   JSON (admin/mod.rs) ───┼── OpsError ◄──────┼── TransitionError
//!   HTML (admin/pages.rs) ─┘                   └── ValidationError
//! ```
//! Imports run one way: the edges use this module; it uses the domain and
//! the store, never an edge.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::domain::{
    assume_unrecorded, decide, Definition, Fact, Saga, SagaId, SagaState, TransitionError,
    ValidationError,
};
use crate::store::{SagaRecord, SagaStore, StoreError};
use crate::worker::Worker;

/// Longest operator note or actor accepted (bytes).
pub const NOTE_BYTES_MAX: usize = 2_048;
/// Most attempts of an operator action against a saga that keeps changing.
const OPERATOR_TRIES_MAX: usize = 5;

/// What a read or an operator action can fail with: the operator layer's
/// error, mapped once by each edge (gRPC status, JSON API, HTML page).
///
/// Messages are client-visible except where a variant says otherwise: they
/// name the field and never carry SQL or driver detail.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// Bad input, naming the field (INVALID_ARGUMENT / 400).
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// The caller may not read what it asked for (UNAUTHENTICATED / 401,
    /// PERMISSION_DENIED / 403); raised where the check needs a stored
    /// saga (a client reading its own).
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthError),
    /// Unknown saga or definition (NOT_FOUND / 404).
    #[error("{0}")]
    NotFound(String),
    /// Same saga id, other content (ALREADY_EXISTS / 409).
    #[error("{0}")]
    AlreadyExists(String),
    /// The saga is not in a state where this applies (FAILED_PRECONDITION / 409).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The saga kept changing under an operator action (ABORTED / 409).
    #[error("{0}")]
    Aborted(String),
    /// The database cannot be reached or this coordinator is stopping: the
    /// same request may succeed later or elsewhere (UNAVAILABLE / 503).
    #[error("{public}")]
    Unavailable {
        /// What the client is told.
        public: &'static str,
        /// What happened, for the log only.
        detail: String,
    },
    /// A bug or corrupt stored data (INTERNAL / 500). The text is for the
    /// log only; clients are told "internal error".
    #[error("internal error")]
    Internal(String),
}

/// What clients are told while the database cannot be reached.
pub const DB_UNAVAILABLE: &str = "database unavailable; try again";

impl From<StoreError> for OpsError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(detail) => OpsError::Unavailable {
                public: DB_UNAVAILABLE,
                detail,
            },
            StoreError::Stopped => OpsError::Unavailable {
                public: "coordinator shutting down; try another",
                detail: "the store is shutting down".into(),
            },
            StoreError::LeaseLost | StoreError::Conflict => {
                OpsError::Aborted("the saga changed concurrently; try again".into())
            }
            StoreError::Busy => OpsError::FailedPrecondition(StoreError::Busy.to_string()),
            StoreError::Internal(detail) => OpsError::Internal(detail),
        }
    }
}

impl From<TransitionError> for OpsError {
    fn from(e: TransitionError) -> Self {
        match e {
            TransitionError::NoteRequired => {
                OpsError::Invalid(ValidationError::new("note", "required"))
            }
            other => OpsError::FailedPrecondition(other.to_string()),
        }
    }
}

/// Longest age filter accepted (100 years).
pub const AGE_SECS_MAX: u64 = 100 * 366 * 86_400;

/// `now - age`; an age beyond [`AGE_SECS_MAX`] is bad input in `field`.
pub fn older_than(
    field: &str,
    now: DateTime<Utc>,
    age: Duration,
) -> Result<DateTime<Utc>, ValidationError> {
    chrono::Duration::from_std(age)
        .ok()
        .filter(|_| age.as_secs() <= AGE_SECS_MAX)
        .and_then(|a| now.checked_sub_signed(a))
        .ok_or_else(|| ValidationError::new(field, "is longer than 100 years"))
}

/// An opaque page token for the keyset cursor `(created_at, saga_id)` of
/// saga lists (the same tokens over gRPC and the JSON API).
pub fn encode_page_token((at, id): (DateTime<Utc>, Uuid)) -> String {
    let raw = format!("{}:{id}", at.timestamp_micros());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
}

/// Parses [`encode_page_token`]'s output (empty = first page).
pub fn decode_page_token(token: &str) -> Result<Option<(DateTime<Utc>, Uuid)>, ValidationError> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || ValidationError::new("page_token", "not a token this server issued");
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| bad())?;
    let raw = String::from_utf8(raw).map_err(|_| bad())?;
    let (micros, id) = raw.split_once(':').ok_or_else(bad)?;
    // Sagas are created by the database's clock: a cursor outside
    // 1970..=9999 was not issued here (and PostgreSQL would refuse some).
    let at = micros
        .parse::<i64>()
        .ok()
        .and_then(DateTime::from_timestamp_micros)
        .filter(|t| (1970..=9999).contains(&chrono::Datelike::year(t)))
        .ok_or_else(bad)?;
    let id = Uuid::parse_str(id).map_err(|_| bad())?;
    Ok(Some((at, id)))
}

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
    ) -> Result<Option<Arc<Definition>>, OpsError> {
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
    pub async fn definition(&self, name: &str, version: u32) -> Result<Arc<Definition>, OpsError> {
        self.worker
            .definition(name, version)
            .await?
            .ok_or_else(|| OpsError::NotFound(format!("definition {name}@{version} not found")))
    }

    /// A saga, or NOT_FOUND.
    pub async fn record(&self, id: SagaId) -> Result<SagaRecord, OpsError> {
        self.store
            .saga_get(id)
            .await?
            .ok_or_else(|| OpsError::NotFound(format!("saga {id} not found")))
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
    ) -> Result<(Saga, Arc<Definition>), OpsError> {
        if note.contains('\0') {
            return Err(ValidationError::new("note", "contains a NUL character").into());
        }
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
                    let saga = self.record(id).await?.saga;
                    // Resolving ends the saga here, not in a worker.
                    if let Some(t) = self.worker.spans().filter(|_| saga.state.is_terminal()) {
                        t.saga_end(&saga, saga.updated_at);
                    }
                    return Ok((saga, def));
                }
                Err(StoreError::Conflict) => continue,
                Err(StoreError::Busy) => return Err(OpsError::FailedPrecondition(
                    "saga is being driven by a coordinator right now: nothing is waiting to retry"
                        .into(),
                )),
                Err(e) => return Err(e.into()),
            }
        }
        Err(OpsError::Aborted(format!(
            "saga {id} kept changing; try again"
        )))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
