//! `saga.v1.CoordinatorService`: the public gRPC API.
//!
//! Handlers authenticate the caller and check its role first, then
//! validate, call the store or the worker, and convert. The work is in
//! methods returning [`OpsError`]; each RPC maps it (and [`AuthError`]) to a
//! status once (`status.rs`). Nothing is written before every check has
//! passed.
//!
//! | RPC | needs |
//! |---|---|
//! | GetDefinition, ListDefinitions | viewer, definer or operator |
//! | GetSaga, WaitSaga, GetSagaEvents | viewer or operator; a client for the sagas it started |
//! | ListSagas | viewer or operator; a client sees the sagas it started |
//! | StartSaga | client |
//! | RegisterDefinition | definer |
//! | RetrySaga, AbortSaga, ResolveSaga | operator |
//! | Heartbeat | participant:<that participant> |
//!
//! `admin` may do everything; with no authentication configured everyone
//! may (loopback only).

pub mod convert;
pub mod status;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::auth::{self, AuthError, Authenticator, Need, Principal};
use crate::domain::{check_name, Defaults, Definition, SagaId, ValidationError};
use crate::limits::KeyedBuckets;
use crate::metrics::Metrics;
use crate::ops::{self, OperatorKind, Ops, OpsError};
use crate::participant::{check_endpoint, check_tls};
use crate::proto;
use crate::proto::coordinator_service_server::CoordinatorService;
use crate::store::{Created, Heartbeat, NewSaga, SagaQuery, SagaRecord, SagaStore, StuckRule};
use crate::worker::Worker;

/// API settings.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Largest and deepest accepted input.
    pub json: crate::domain::JsonLimits,
    /// Defaults for definitions.
    pub defaults: Defaults,
    /// `WaitSaga` timeout when unset.
    pub wait_default: Duration,
    /// Longest `WaitSaga` timeout.
    pub wait_max: Duration,
    /// How often a waiter re-reads the saga if no notification arrives.
    pub wait_recheck: Duration,
    /// `ListSagas` rows when the request asks for none.
    pub page_rows_default: u32,
    /// Most `ListSagas` rows.
    pub page_rows_max: u32,
    /// Byte budget of a `ListSagas` page.
    pub page_bytes_max: usize,
    /// Most `WaitSaga` calls waiting at once.
    pub waits_max: usize,
    /// StartSaga/RegisterDefinition per second per principal (0: none)
    /// and the burst above it.
    pub start_rate_per_principal: u32,
    /// See `start_rate_per_principal`.
    pub start_burst_per_principal: u32,
    /// What "stuck" means.
    pub stuck: StuckRule,
    /// Heartbeat TTL when unset.
    pub heartbeat_ttl_default: Duration,
    /// Heartbeats must name `https://` endpoints.
    pub require_participant_tls: bool,
}

/// The service.
pub struct CoordinatorApi {
    store: Arc<dyn SagaStore>,
    worker: Arc<Worker>,
    ops: Ops,
    metrics: Arc<Metrics>,
    settled: broadcast::Sender<Uuid>,
    stop: CancellationToken,
    auth: Arc<Authenticator>,
    starts: Option<KeyedBuckets>,
    waits: Arc<tokio::sync::Semaphore>,
    cfg: ApiConfig,
}

type Rpc<T> = Result<Response<T>, Status>;

impl CoordinatorApi {
    /// A service over `store`, starting sagas on `worker`. `settled` carries
    /// the ids of sagas that settled (`Uuid::nil()` = re-read everything).
    pub fn new(
        ops: Ops,
        metrics: Arc<Metrics>,
        settled: broadcast::Sender<Uuid>,
        stop: CancellationToken,
        auth: Arc<Authenticator>,
        cfg: ApiConfig,
    ) -> Self {
        CoordinatorApi {
            store: ops.store.clone(),
            worker: ops.worker.clone(),
            ops,
            metrics,
            settled,
            stop,
            auth,
            starts: (cfg.start_rate_per_principal > 0).then(|| {
                KeyedBuckets::new(
                    f64::from(cfg.start_rate_per_principal),
                    cfg.start_burst_per_principal,
                )
            }),
            waits: Arc::new(tokio::sync::Semaphore::new(cfg.waits_max)),
            cfg,
        }
    }

    /// Spends one of `who`'s StartSaga/RegisterDefinition tokens.
    fn rate(&self, who: &Principal) -> Result<(), Status> {
        let Some(starts) = &self.starts else {
            return Ok(());
        };
        starts
            .take(&who.name, std::time::Instant::now())
            .map_err(|wait| {
                status::exhausted(
                    format!(
                        "{} is over its rate of StartSaga and RegisterDefinition calls (--start-rate-per-principal)",
                        who.name
                    ),
                    wait,
                )
            })
    }

    async fn definition(&self, name: &str, version: u32) -> Result<Arc<Definition>, OpsError> {
        self.ops.definition(name, version).await
    }

    /// The caller: its bearer credential, else its client certificate.
    fn caller<T>(&self, r: &Request<T>) -> Result<Arc<Principal>, AuthError> {
        let given = r
            .metadata()
            .get("authorization")
            .map(|v| v.to_str().unwrap_or("?"));
        let subject = r
            .extensions()
            .get::<crate::tls::TlsConnectInfo>()
            .and_then(|i| i.peer_subject.as_deref());
        self.auth.authenticate(given, subject)
    }

    /// The caller, if it may do what `need` names.
    fn allowed<T>(&self, r: &Request<T>, need: Need<'_>) -> Result<Arc<Principal>, Status> {
        let who = self.caller(r)?;
        who.require(need)?;
        Ok(who)
    }

    /// May `who` read saga `id`? Readers may; a client only its own.
    async fn check_read(&self, who: &Principal, id: SagaId) -> Result<(), OpsError> {
        if who.may(Need::ReadSagas) {
            return Ok(());
        }
        let rec = self.record(id).await?;
        who.require(Need::ReadSaga(rec.saga.started_by.as_deref()))
            .map_err(OpsError::from)
    }

    async fn saga_out(&self, saga: &crate::domain::Saga) -> Result<proto::Saga, OpsError> {
        let def = self.definition(&saga.definition, saga.version).await?;
        Ok(convert::saga_out(saga, &def))
    }

    async fn record(&self, id: SagaId) -> Result<SagaRecord, OpsError> {
        self.ops.record(id).await
    }

    async fn start(
        &self,
        r: proto::StartSagaRequest,
        who: &Principal,
        trace: Option<crate::domain::SagaTrace>,
    ) -> Result<proto::StartSagaResponse, OpsError> {
        check_name("definition", &r.definition, false)?;
        let id = if r.saga_id.is_empty() {
            // Time-ordered (UUIDv7): new sagas land at one end of the
            // primary key's index instead of on random pages of all of it,
            // which keeps inserts cheap however many sagas the table holds.
            SagaId(Uuid::now_v7())
        } else {
            SagaId::parse("saga_id", &r.saga_id)?
        };
        let input = self.json_input("input_json", r.input_json)?;
        let version = (r.version != 0).then_some(r.version);
        let def = self
            .ops
            .definition_for_start(&r.definition, version)
            .await?
            .ok_or_else(|| match version {
                Some(v) => OpsError::NotFound(format!("definition {}@{v} not found", r.definition)),
                None => OpsError::NotFound(format!("definition {} not found", r.definition)),
            })?;
        let permit = self.worker.try_reserve();
        let owner = permit
            .as_ref()
            .map(|_| (self.worker.owner(), self.worker.lease_ttl()));
        let created = self
            .store
            .saga_create(NewSaga {
                id,
                definition: (*def).clone(),
                input: input.clone(),
                owner,
                started_by: who.audit_name().map(str::to_owned),
                trace,
            })
            .await?;
        match created {
            Created::New(saga, lease, db_now) => {
                self.worker.observe_db_now(db_now);
                self.metrics.saga_started();
                let out = convert::saga_out(&saga, &def);
                if let (Some(lease), Some(permit)) = (lease, permit) {
                    self.worker.spawn_drive(saga, lease, false, permit);
                }
                Ok(proto::StartSagaResponse {
                    saga: Some(out),
                    created: true,
                })
            }
            Created::Existing(existing) => {
                let same = existing.definition == def.name
                    && (version.is_none() || existing.version == def.version)
                    && json_eq(&existing.input, &input);
                if !same {
                    return Err(OpsError::AlreadyExists(format!(
                        "saga {id} already exists with another definition, version or input"
                    )));
                }
                Ok(proto::StartSagaResponse {
                    saga: Some(self.saga_out(&existing).await?),
                    created: false,
                })
            }
        }
    }

    /// Checks a JSON payload: size, depth, syntax (empty is `null`).
    fn json_input(&self, field: &str, text: String) -> Result<String, ValidationError> {
        if text.is_empty() {
            return Ok("null".into());
        }
        self.cfg
            .json
            .check(&text)
            .map_err(|why| ValidationError::new(field, why))?;
        Ok(text)
    }

    async fn wait(&self, r: proto::WaitSagaRequest) -> Result<proto::Saga, OpsError> {
        let id = SagaId::parse("saga_id", &r.saga_id)?;
        let timeout = convert::duration_in("timeout", r.timeout.as_ref())?
            .unwrap_or(self.cfg.wait_default)
            .min(self.cfg.wait_max);
        let until = tokio::time::Instant::now() + timeout;
        // Driven here: the worker hands over the settled saga, no reads.
        if let Some(mut local) = self.worker.watch_local(id) {
            let settled = tokio::time::timeout_at(until, async {
                loop {
                    if let Some(s) = local.borrow_and_update().clone() {
                        return Some(s);
                    }
                    if local.changed().await.is_err() {
                        return None;
                    }
                }
            });
            tokio::select! {
                r = settled => {
                    if let Ok(Some(saga)) = r {
                        return self.saga_out(&saga).await;
                    }
                    // Timed out, or no longer driven here: read below.
                }
                _ = self.stop.cancelled() => {}
            }
        }
        // Subscribe before reading, so a change between the read and the
        // wait is not missed.
        let mut rx = self.settled.subscribe();
        loop {
            let rec = self.record(id).await?;
            let now = tokio::time::Instant::now();
            if rec.saga.state.is_settled() || now >= until || self.stop.is_cancelled() {
                return self.saga_out(&rec.saga).await;
            }
            let recheck = until.min(now + self.cfg.wait_recheck);
            tokio::select! {
                _ = tokio::time::sleep_until(recheck) => {}
                _ = next_change(&mut rx, id.0) => {}
                // Shutting down: answer with the saga as it stands.
                _ = self.stop.cancelled() => {}
            }
        }
    }

    async fn list(
        &self,
        r: proto::ListSagasRequest,
        who: &Principal,
    ) -> Result<proto::ListSagasResponse, OpsError> {
        if !who.reads_own_only() {
            who.require(Need::ReadSagas)?;
        }
        let states = r
            .states
            .iter()
            .enumerate()
            .map(|(i, s)| convert::saga_state_in(&format!("states[{i}]"), *s))
            .collect::<Result<Vec<_>, _>>()?;
        if !r.definition.is_empty() {
            check_name("definition", &r.definition, false)?;
        }
        let limit = match r.page_size {
            0 => self.cfg.page_rows_default,
            n => n.min(self.cfg.page_rows_max),
        };
        let query = SagaQuery {
            states,
            definition: (!r.definition.is_empty()).then_some(r.definition),
            stuck: r.stuck_only.then_some(self.cfg.stuck),
            created_before: convert::duration_in("min_age", r.min_age.as_ref())?
                .map(|age| ops::older_than("min_age", self.worker.db_now(), age))
                .transpose()?,
            limit,
            after: ops::decode_page_token(&r.page_token)?,
            started_by: who.reads_own_only().then(|| who.name.clone()),
            bytes_max: Some(self.cfg.page_bytes_max),
        };
        let page = self.store.saga_list(&query).await?;
        let mut sagas = Vec::with_capacity(page.sagas.len());
        for s in &page.sagas {
            sagas.push(self.saga_out(s).await?);
        }
        Ok(proto::ListSagasResponse {
            sagas,
            next_page_token: page.next.map(ops::encode_page_token).unwrap_or_default(),
        })
    }

    async fn operator(
        &self,
        id: &str,
        note: &str,
        actor: String,
        kind: OperatorKind,
    ) -> Result<proto::Saga, OpsError> {
        let (saga, def) = self
            .ops
            .operator(SagaId::parse("saga_id", id)?, kind, &actor, note)
            .await?;
        Ok(convert::saga_out(&saga, &def))
    }

    async fn heartbeat(&self, r: proto::HeartbeatRequest, who: &Principal) -> Result<(), OpsError> {
        check_name("participant", &r.participant, false)?;
        who.require(Need::Heartbeat(&r.participant))?;
        if r.instance_id.is_empty()
            || r.instance_id.len() > 128
            || r.instance_id.chars().any(char::is_control)
        {
            return Err(ValidationError::new(
                "instance_id",
                "must be 1 to 128 bytes without control characters",
            )
            .into());
        }
        check_endpoint(&r.endpoint)
            .and_then(|_| check_tls(&r.endpoint, self.cfg.require_participant_tls))
            .map_err(|e| ValidationError::new("endpoint", e))?;
        let ttl =
            convert::duration_in("ttl", r.ttl.as_ref())?.unwrap_or(self.cfg.heartbeat_ttl_default);
        // An explicit zero withdraws the instance at once (a participant
        // shutting down); otherwise 100 ms ..= 1 h.
        if !ttl.is_zero() && (ttl < Duration::from_millis(100) || ttl > Duration::from_secs(3_600))
        {
            return Err(ValidationError::new(
                "ttl",
                format!("{ttl:?} is outside 100ms..=1h (0 withdraws the instance)"),
            )
            .into());
        }
        if r.weight > WEIGHT_MAX {
            let why = format!("{} is over {WEIGHT_MAX}", r.weight);
            return Err(ValidationError::new("weight", why).into());
        }
        let beat = Heartbeat {
            participant: &r.participant,
            instance_id: &r.instance_id,
            endpoint: &r.endpoint,
            weight: r.weight.max(1),
            ttl,
        };
        self.store
            .participant_heartbeat(&beat, who.audit_name())
            .await?;
        if ttl.is_zero() {
            tracing::info!(participant = %r.participant, instance = %r.instance_id,
                by = %who.name, "participant instance withdrawn");
        }
        Ok(())
    }
}

/// The largest weight an instance may announce.
const WEIGHT_MAX: u32 = 1_000;

/// Waits for a notification about `id` (or a resync, or a lagged receiver).
async fn next_change(rx: &mut broadcast::Receiver<Uuid>, id: Uuid) {
    loop {
        match rx.recv().await {
            Ok(got) if got == id || got.is_nil() => return,
            Ok(_) => continue,
            Err(broadcast::error::RecvError::Lagged(_)) => return,
            // Shutting down: let the re-check timer decide.
            Err(broadcast::error::RecvError::Closed) => std::future::pending::<()>().await,
        }
    }
}

fn json_eq(a: &str, b: &str) -> bool {
    match (
        serde_json::from_str::<serde_json::Value>(a),
        serde_json::from_str::<serde_json::Value>(b),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// Who an operator action is recorded as: the principal, with the person
/// named in the actor metadata, if any.
fn actor<T>(r: &Request<T>, who: &Principal) -> String {
    let named = r
        .metadata()
        .get(auth::ACTOR_HEADER)
        .and_then(|v| v.to_str().ok());
    who.actor(named, "grpc")
}

#[tonic::async_trait]
impl CoordinatorService for CoordinatorApi {
    async fn register_definition(
        &self,
        r: Request<proto::RegisterDefinitionRequest>,
    ) -> Rpc<proto::RegisterDefinitionResponse> {
        let who = self.allowed(&r, Need::Define)?;
        self.rate(&who)?;
        let run = async {
            let draft = convert::definition_in(r.into_inner().definition)?;
            let def = draft.validate(&self.cfg.defaults)?;
            let (def, created) = self
                .store
                .definition_register(def, who.audit_name())
                .await?;
            self.ops.remember_latest(Arc::new(def.clone()));
            let (_, registered) = self
                .store
                .definition_get(&def.name, Some(def.version))
                .await?
                .ok_or_else(|| OpsError::NotFound("definition vanished".into()))?;
            Ok::<_, OpsError>(proto::RegisterDefinitionResponse {
                definition: Some(convert::definition_out(&def, Some(&registered))),
                created,
            })
        };
        Ok(Response::new(run.await?))
    }

    async fn get_definition(
        &self,
        r: Request<proto::GetDefinitionRequest>,
    ) -> Rpc<proto::GetDefinitionResponse> {
        self.allowed(&r, Need::ReadDefinitions)?;
        let r = r.into_inner();
        let run = async {
            check_name("name", &r.name, false)?;
            let version = (r.version != 0).then_some(r.version);
            let (def, at) = self
                .store
                .definition_get(&r.name, version)
                .await?
                .ok_or_else(|| {
                    OpsError::NotFound(format!(
                        "definition {} (version {}) not found",
                        r.name, r.version
                    ))
                })?;
            Ok::<_, OpsError>(proto::GetDefinitionResponse {
                definition: Some(convert::definition_out(&def, Some(&at))),
            })
        };
        Ok(Response::new(run.await?))
    }

    async fn list_definitions(
        &self,
        r: Request<proto::ListDefinitionsRequest>,
    ) -> Rpc<proto::ListDefinitionsResponse> {
        self.allowed(&r, Need::ReadDefinitions)?;
        let defs = self.store.definition_list().await.map_err(OpsError::from)?;
        Ok(Response::new(proto::ListDefinitionsResponse {
            definitions: defs
                .iter()
                .map(|(d, at)| convert::definition_out(d, Some(at)))
                .collect(),
        }))
    }

    async fn start_saga(
        &self,
        r: Request<proto::StartSagaRequest>,
    ) -> Rpc<proto::StartSagaResponse> {
        let who = self.allowed(&r, Need::Start)?;
        self.rate(&who)?;
        let caller = proto::trace::TraceParent::from_metadata(r.metadata());
        let trace = crate::telemetry::join(self.worker.spans().is_some(), caller);
        Ok(Response::new(
            self.start(r.into_inner(), &who, trace).await?,
        ))
    }

    async fn get_saga(&self, r: Request<proto::GetSagaRequest>) -> Rpc<proto::GetSagaResponse> {
        let who = self.caller(&r)?;
        let run = async {
            let rec = self
                .record(SagaId::parse("saga_id", &r.get_ref().saga_id)?)
                .await?;
            who.require(Need::ReadSaga(rec.saga.started_by.as_deref()))?;
            Ok::<_, OpsError>(proto::GetSagaResponse {
                saga: Some(self.saga_out(&rec.saga).await?),
            })
        };
        Ok(Response::new(run.await?))
    }

    async fn wait_saga(&self, r: Request<proto::WaitSagaRequest>) -> Rpc<proto::WaitSagaResponse> {
        let who = self.caller(&r)?;
        let _waiting = self.waits.clone().try_acquire_owned().map_err(|_| {
            status::exhausted(
                format!(
                    "{} WaitSaga calls are waiting already (--waits-max)",
                    self.cfg.waits_max
                ),
                Duration::from_secs(1),
            )
        })?;
        let r = r.into_inner();
        let run = async {
            self.check_read(&who, SagaId::parse("saga_id", &r.saga_id)?)
                .await?;
            self.wait(r).await
        };
        Ok(Response::new(proto::WaitSagaResponse {
            saga: Some(run.await?),
        }))
    }

    async fn list_sagas(
        &self,
        r: Request<proto::ListSagasRequest>,
    ) -> Rpc<proto::ListSagasResponse> {
        let who = self.caller(&r)?;
        Ok(Response::new(self.list(r.into_inner(), &who).await?))
    }

    async fn get_saga_events(
        &self,
        r: Request<proto::GetSagaEventsRequest>,
    ) -> Rpc<proto::GetSagaEventsResponse> {
        let who = self.caller(&r)?;
        let run = async {
            let id = SagaId::parse("saga_id", &r.get_ref().saga_id)?;
            let rec = self.record(id).await?;
            who.require(Need::ReadSaga(rec.saga.started_by.as_deref()))?;
            let events = self.store.saga_events(id).await?;
            Ok::<_, OpsError>(proto::GetSagaEventsResponse {
                events: events.iter().map(convert::event_out).collect(),
            })
        };
        Ok(Response::new(run.await?))
    }

    async fn retry_saga(
        &self,
        r: Request<proto::RetrySagaRequest>,
    ) -> Rpc<proto::RetrySagaResponse> {
        let who = self.allowed(&r, Need::Operate)?;
        let actor = actor(&r, &who);
        let r = r.into_inner();
        let saga = self
            .operator(&r.saga_id, &r.note, actor, OperatorKind::Retry)
            .await?;
        Ok(Response::new(proto::RetrySagaResponse { saga: Some(saga) }))
    }

    async fn abort_saga(
        &self,
        r: Request<proto::AbortSagaRequest>,
    ) -> Rpc<proto::AbortSagaResponse> {
        let who = self.allowed(&r, Need::Operate)?;
        let actor = actor(&r, &who);
        let r = r.into_inner();
        let saga = self
            .operator(&r.saga_id, &r.note, actor, OperatorKind::Abort)
            .await?;
        Ok(Response::new(proto::AbortSagaResponse { saga: Some(saga) }))
    }

    async fn resolve_saga(
        &self,
        r: Request<proto::ResolveSagaRequest>,
    ) -> Rpc<proto::ResolveSagaResponse> {
        let who = self.allowed(&r, Need::Operate)?;
        let actor = actor(&r, &who);
        let r = r.into_inner();
        let saga = self
            .operator(&r.saga_id, &r.note, actor, OperatorKind::Resolve)
            .await?;
        Ok(Response::new(proto::ResolveSagaResponse {
            saga: Some(saga),
        }))
    }

    async fn heartbeat(
        &self,
        r: Request<proto::HeartbeatRequest>,
    ) -> Rpc<proto::HeartbeatResponse> {
        let who = self.caller(&r)?;
        self.heartbeat(r.into_inner(), &who).await?;
        Ok(Response::new(proto::HeartbeatResponse {}))
    }
}
