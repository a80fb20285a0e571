//! The coordinator client: definitions, sagas, operator calls.

use std::time::{Duration, SystemTime};

use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use uuid::Uuid;

use crate::definition::{duration, DefinitionError, SagaDefinition};
use crate::proto;
use crate::proto::coordinator_service_client::CoordinatorServiceClient;

/// What a client call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The coordinator could not be reached.
    #[error("cannot connect to the coordinator at {url}: {source}")]
    Connect {
        /// Where.
        url: String,
        /// Why.
        source: tonic::transport::Error,
    },
    /// The coordinator refused the request's content (the message names the
    /// field).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// No such saga or definition.
    #[error("not found: {0}")]
    NotFound(String),
    /// The saga id is taken by another start.
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// The saga is not in a state where this applies.
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// The coordinator or its database is unavailable right now; try again.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The definition was refused before sending.
    #[error("definition: {0}")]
    Definition(#[from] DefinitionError),
    /// A payload did not (de)serialize.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    /// The coordinator answered something this SDK does not understand.
    #[error("protocol: {0}")]
    Protocol(String),
    /// Any other status (boxed: `Status` is large).
    #[error("{0}")]
    Status(Box<Status>),
}

impl ClientError {
    /// The gRPC status code this error stands for: the coordinator's answer,
    /// or the code a local refusal would have had (`Definition` →
    /// `INVALID_ARGUMENT`, `Connect` → `UNAVAILABLE`).
    pub fn code(&self) -> Code {
        match self {
            ClientError::Connect { .. } | ClientError::Unavailable(_) => Code::Unavailable,
            ClientError::InvalidArgument(_) | ClientError::Definition(_) => Code::InvalidArgument,
            ClientError::NotFound(_) => Code::NotFound,
            ClientError::AlreadyExists(_) => Code::AlreadyExists,
            ClientError::FailedPrecondition(_) => Code::FailedPrecondition,
            ClientError::Json(_) | ClientError::Protocol(_) => Code::Internal,
            ClientError::Status(s) => s.code(),
        }
    }
}

impl From<Status> for ClientError {
    fn from(s: Status) -> Self {
        let m = s.message().to_owned();
        match s.code() {
            Code::InvalidArgument => ClientError::InvalidArgument(m),
            Code::NotFound => ClientError::NotFound(m),
            Code::AlreadyExists => ClientError::AlreadyExists(m),
            Code::FailedPrecondition => ClientError::FailedPrecondition(m),
            Code::Unavailable => ClientError::Unavailable(m),
            _ => ClientError::Status(Box::new(s)),
        }
    }
}

/// A saga's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SagaState {
    /// Going forward.
    Running,
    /// Running compensations.
    Compensating,
    /// Every step applied.
    Completed,
    /// Every applied step compensated.
    Compensated,
    /// Needs an operator.
    Suspended,
    /// Finished by an operator.
    Resolved,
}

impl SagaState {
    fn from_proto(v: i32) -> Result<Self, ClientError> {
        Ok(match proto::SagaState::try_from(v) {
            Ok(proto::SagaState::Running) => SagaState::Running,
            Ok(proto::SagaState::Compensating) => SagaState::Compensating,
            Ok(proto::SagaState::Completed) => SagaState::Completed,
            Ok(proto::SagaState::Compensated) => SagaState::Compensated,
            Ok(proto::SagaState::Suspended) => SagaState::Suspended,
            Ok(proto::SagaState::Resolved) => SagaState::Resolved,
            _ => return Err(ClientError::Protocol(format!("unknown saga state {v}"))),
        })
    }

    fn to_proto(self) -> proto::SagaState {
        match self {
            SagaState::Running => proto::SagaState::Running,
            SagaState::Compensating => proto::SagaState::Compensating,
            SagaState::Completed => proto::SagaState::Completed,
            SagaState::Compensated => proto::SagaState::Compensated,
            SagaState::Suspended => proto::SagaState::Suspended,
            SagaState::Resolved => proto::SagaState::Resolved,
        }
    }

    /// Whether `WaitSaga` returns on this state.
    pub fn is_settled(self) -> bool {
        !matches!(self, SagaState::Running | SagaState::Compensating)
    }

    /// Upper-case name, as the coordinator's contract spells it (`RUNNING`).
    pub fn as_str(self) -> &'static str {
        self.to_proto()
            .as_str_name()
            .trim_start_matches("SAGA_STATE_")
    }

    /// Parses a name in any case (`suspended`, `SUSPENDED`).
    pub fn parse(name: &str) -> Option<SagaState> {
        let wire = format!("SAGA_STATE_{}", name.to_ascii_uppercase());
        let v = proto::SagaState::from_str_name(&wire)?;
        SagaState::from_proto(v as i32).ok()
    }
}

/// A step's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StepState {
    /// Not started, or nothing took effect yet.
    Pending,
    /// Invoked; outcome unknown.
    Running,
    /// The action succeeded.
    Succeeded,
    /// The action was refused.
    Failed,
    /// The compensation is being retried.
    Compensating,
    /// Compensated.
    Compensated,
}

impl StepState {
    fn from_proto(v: i32) -> Result<Self, ClientError> {
        Ok(match proto::StepState::try_from(v) {
            Ok(proto::StepState::Pending) => StepState::Pending,
            Ok(proto::StepState::Running) => StepState::Running,
            Ok(proto::StepState::Succeeded) => StepState::Succeeded,
            Ok(proto::StepState::Failed) => StepState::Failed,
            Ok(proto::StepState::Compensating) => StepState::Compensating,
            Ok(proto::StepState::Compensated) => StepState::Compensated,
            _ => return Err(ClientError::Protocol(format!("unknown step state {v}"))),
        })
    }

    /// Upper-case name, as the coordinator's contract spells it (`SUCCEEDED`).
    pub fn as_str(self) -> &'static str {
        match self {
            StepState::Pending => "PENDING",
            StepState::Running => "RUNNING",
            StepState::Succeeded => "SUCCEEDED",
            StepState::Failed => "FAILED",
            StepState::Compensating => "COMPENSATING",
            StepState::Compensated => "COMPENSATED",
        }
    }
}

/// One step of a saga as the coordinator reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct StepStatus {
    /// Step name.
    pub name: String,
    /// State.
    pub state: StepState,
    /// Action attempts.
    pub attempts: u32,
    /// Compensation attempts.
    pub compensation_attempts: u32,
    /// Last error, if any.
    pub last_error: Option<String>,
    /// The action's output (JSON text).
    pub output_json: Option<String>,
    /// When the next attempt is due.
    pub next_attempt_at: Option<SystemTime>,
}

/// A saga as the coordinator reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct Saga {
    /// Id.
    pub id: Uuid,
    /// Definition name.
    pub definition: String,
    /// Definition version.
    pub version: u32,
    /// State.
    pub state: SagaState,
    /// Input (JSON text).
    pub input_json: String,
    /// Steps.
    pub steps: Vec<StepStatus>,
    /// Why it is compensating, compensated or suspended.
    pub error: Option<String>,
    /// Started.
    pub created_at: Option<SystemTime>,
    /// Last changed.
    pub updated_at: Option<SystemTime>,
    /// The principal that started it (none when sagad authenticates no
    /// one).
    pub started_by: Option<String>,
}

impl Saga {
    /// The input as `T`.
    pub fn input<T: DeserializeOwned>(&self) -> Result<T, ClientError> {
        Ok(serde_json::from_str(&self.input_json)?)
    }

    /// The output of step `name` as `T`, if it has one.
    pub fn output<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, ClientError> {
        match self
            .steps
            .iter()
            .find(|s| s.name == name)
            .and_then(|s| s.output_json.as_deref())
        {
            Some(o) => Ok(Some(serde_json::from_str(o)?)),
            None => Ok(None),
        }
    }

    fn from_proto(s: Option<proto::Saga>) -> Result<Saga, ClientError> {
        let s = s.ok_or_else(|| ClientError::Protocol("answer without a saga".into()))?;
        let steps = s
            .steps
            .into_iter()
            .map(|st| {
                Ok(StepStatus {
                    name: st.name,
                    state: StepState::from_proto(st.state)?,
                    attempts: st.attempts,
                    compensation_attempts: st.compensation_attempts,
                    last_error: non_empty(st.last_error),
                    output_json: non_empty(st.output_json),
                    next_attempt_at: st.next_attempt_at.and_then(time),
                })
            })
            .collect::<Result<_, ClientError>>()?;
        Ok(Saga {
            id: Uuid::parse_str(&s.saga_id)
                .map_err(|e| ClientError::Protocol(format!("saga_id: {e}")))?,
            definition: s.definition,
            version: s.version,
            state: SagaState::from_proto(s.state)?,
            input_json: s.input_json,
            steps,
            error: non_empty(s.error),
            created_at: s.created_at.and_then(time),
            updated_at: s.updated_at.and_then(time),
            started_by: (!s.started_by.is_empty()).then_some(s.started_by),
        })
    }
}

/// One entry of a saga's history.
#[derive(Debug, Clone, PartialEq)]
pub struct SagaEvent {
    /// 1-based sequence number.
    pub seq: u64,
    /// When.
    pub at: Option<SystemTime>,
    /// Kind, e.g. `step_succeeded`.
    pub kind: String,
    /// Step, for step events.
    pub step: Option<String>,
    /// Attempt, where it applies.
    pub attempt: u32,
    /// Detail for people.
    pub detail: String,
}

/// Options of [`Client::start_with`].
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    /// Definition version; `None` = latest.
    pub version: Option<u32>,
    /// A caller-chosen id makes the start idempotent.
    pub saga_id: Option<Uuid>,
}

/// A started saga, and whether this call created it.
#[derive(Debug, Clone, PartialEq)]
pub struct Started {
    /// The saga.
    pub saga: Saga,
    /// `false` when the same id and input had started it before.
    pub created: bool,
}

/// Filters of [`Client::list`].
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    /// Only these states (empty = any).
    pub states: Vec<SagaState>,
    /// Only this definition.
    pub definition: Option<String>,
    /// Only stuck sagas.
    pub stuck_only: bool,
    /// Only sagas at least this old.
    pub min_age: Option<Duration>,
    /// Page size (0 = the coordinator's default).
    pub page_size: u32,
    /// Token from the previous page.
    pub page_token: Option<String>,
}

/// One page of sagas.
#[derive(Debug, Clone)]
pub struct SagaPage {
    /// Newest first.
    pub sagas: Vec<Saga>,
    /// Token of the next page, if any.
    pub next_page_token: Option<String>,
}

/// TLS towards the coordinator (PEM). Unset: the system's roots, no client
/// certificate.
#[derive(Clone, Default)]
pub struct ClientTls {
    /// CA certificates the coordinator's certificate must chain to.
    pub ca_pem: Option<Vec<u8>>,
    /// Certificate chain and key presented for mutual TLS.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("ClientTls")
            .field("ca_pem", &self.ca_pem.as_ref().map(|_| "…"))
            .field("identity", &self.identity.as_ref().map(|_| "…"))
            .finish()
    }
}

impl ClientTls {
    fn config(&self) -> tonic::transport::ClientTlsConfig {
        use tonic::transport::{Certificate, ClientTlsConfig, Identity};
        let tls = match &self.ca_pem {
            Some(pem) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)),
            None => ClientTlsConfig::new().with_native_roots(),
        };
        match &self.identity {
            Some((cert, key)) => tls.identity(Identity::from_pem(cert, key)),
            None => tls,
        }
    }
}

/// A client of `saga.v1.CoordinatorService`. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Client {
    inner: CoordinatorServiceClient<Channel>,
    actor: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
    authorization: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

/// How long a call may take, beyond which it fails (`WaitSaga` gets its own
/// timeout on top).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

impl Client {
    /// Connects to a coordinator (`http://127.0.0.1:50051`, or `https://…`
    /// verified against the system's roots), giving up after five seconds.
    pub async fn connect(url: impl Into<String>) -> Result<Client, ClientError> {
        Client::connect_tls(url, ClientTls::default()).await
    }

    /// Connects with TLS settings: the CA that signed the coordinator's
    /// certificate, and a client certificate for mutual TLS. They apply to
    /// `https://` URLs.
    pub async fn connect_tls(
        url: impl Into<String>,
        tls: ClientTls,
    ) -> Result<Client, ClientError> {
        let url = url.into();
        let connect_err = |url: &str| {
            let url = url.to_owned();
            move |source| ClientError::Connect { url, source }
        };
        let mut endpoint = Endpoint::from_shared(url.clone())
            .map_err(connect_err(&url))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true);
        if url.starts_with("https://") {
            endpoint = endpoint
                .tls_config(tls.config())
                .map_err(connect_err(&url))?;
        }
        let channel = endpoint
            .connect()
            .await
            .map_err(|source| ClientError::Connect { url, source })?;
        Ok(Client {
            inner: CoordinatorServiceClient::new(channel),
            actor: None,
            authorization: None,
        })
    }

    /// Names who performs operator calls (recorded in the saga's history).
    pub fn with_actor(mut self, actor: &str) -> Result<Client, ClientError> {
        let v = actor
            .parse()
            .map_err(|_| ClientError::InvalidArgument(format!("actor {actor:?} is not ASCII")))?;
        self.actor = Some(v);
        Ok(self)
    }

    /// Sends `token` as `authorization: Bearer <token>` with every call
    /// (the coordinator's admin token, for operator calls). The token is
    /// kept out of `Debug` output.
    pub fn with_token(mut self, token: &str) -> Result<Client, ClientError> {
        let mut v: tonic::metadata::MetadataValue<_> = format!("Bearer {token}")
            .parse()
            .map_err(|_| ClientError::InvalidArgument("the token is not printable ASCII".into()))?;
        v.set_sensitive(true);
        self.authorization = Some(v);
        Ok(self)
    }

    fn request<T>(&self, msg: T, timeout: Duration) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.set_timeout(timeout);
        if let Some(actor) = &self.actor {
            r.metadata_mut().insert("x-saga-actor", actor.clone());
        }
        if let Some(auth) = &self.authorization {
            r.metadata_mut().insert("authorization", auth.clone());
        }
        r
    }

    /// Every version of every registered definition, by name then version.
    pub async fn definitions(&self) -> Result<Vec<SagaDefinition>, ClientError> {
        let r = self
            .inner
            .clone()
            .list_definitions(self.request(proto::ListDefinitionsRequest {}, CALL_TIMEOUT))
            .await?
            .into_inner();
        Ok(r.definitions
            .into_iter()
            .map(|proto| SagaDefinition { proto })
            .collect())
    }

    /// Registers a definition; returns it with its version, and whether the
    /// version is new.
    pub async fn register(
        &self,
        def: &SagaDefinition,
    ) -> Result<(SagaDefinition, bool), ClientError> {
        let req = proto::RegisterDefinitionRequest {
            definition: Some(def.to_proto()),
        };
        let r = self
            .inner
            .clone()
            .register_definition(self.request(req, CALL_TIMEOUT))
            .await?
            .into_inner();
        let proto = r
            .definition
            .ok_or_else(|| ClientError::Protocol("answer without a definition".into()))?;
        Ok((SagaDefinition { proto }, r.created))
    }

    /// Starts a saga of the latest version of `definition`.
    pub async fn start<I: Serialize>(
        &self,
        definition: &str,
        input: &I,
    ) -> Result<Saga, ClientError> {
        Ok(self
            .start_with(definition, input, StartOptions::default())
            .await?
            .saga)
    }

    /// Starts a saga with options (version, caller-chosen id).
    pub async fn start_with<I: Serialize>(
        &self,
        definition: &str,
        input: &I,
        options: StartOptions,
    ) -> Result<Started, ClientError> {
        let req = proto::StartSagaRequest {
            definition: definition.into(),
            version: options.version.unwrap_or(0),
            saga_id: options.saga_id.map(|u| u.to_string()).unwrap_or_default(),
            input_json: serde_json::to_string(input)?,
        };
        let mut request = self.request(req, CALL_TIMEOUT);
        // The saga joins the caller's trace (see the `trace` module).
        crate::trace::inject_current(request.metadata_mut());
        let r = self.inner.clone().start_saga(request).await?.into_inner();
        Ok(Started {
            saga: Saga::from_proto(r.saga)?,
            created: r.created,
        })
    }

    /// The saga as it stands.
    pub async fn get(&self, id: Uuid) -> Result<Saga, ClientError> {
        let req = proto::GetSagaRequest {
            saga_id: id.to_string(),
        };
        Saga::from_proto(
            self.inner
                .clone()
                .get_saga(self.request(req, CALL_TIMEOUT))
                .await?
                .into_inner()
                .saga,
        )
    }

    /// Waits until the saga settles (completed, compensated, suspended,
    /// resolved) or `timeout` passes; returns it as it stands then.
    pub async fn wait(&self, id: Uuid, timeout: Duration) -> Result<Saga, ClientError> {
        let req = proto::WaitSagaRequest {
            saga_id: id.to_string(),
            timeout: Some(duration(timeout)),
        };
        let r = self
            .inner
            .clone()
            .wait_saga(self.request(req, timeout + CALL_TIMEOUT))
            .await?;
        Saga::from_proto(r.into_inner().saga)
    }

    /// A page of sagas.
    pub async fn list(&self, q: ListQuery) -> Result<SagaPage, ClientError> {
        let req = proto::ListSagasRequest {
            states: q.states.iter().map(|s| s.to_proto() as i32).collect(),
            definition: q.definition.unwrap_or_default(),
            stuck_only: q.stuck_only,
            page_size: q.page_size,
            page_token: q.page_token.unwrap_or_default(),
            min_age: q.min_age.map(duration),
        };
        let r = self
            .inner
            .clone()
            .list_sagas(self.request(req, CALL_TIMEOUT))
            .await?
            .into_inner();
        Ok(SagaPage {
            sagas: r
                .sagas
                .into_iter()
                .map(|s| Saga::from_proto(Some(s)))
                .collect::<Result<_, _>>()?,
            next_page_token: non_empty(r.next_page_token),
        })
    }

    /// The saga's history, oldest first.
    pub async fn events(&self, id: Uuid) -> Result<Vec<SagaEvent>, ClientError> {
        let req = proto::GetSagaEventsRequest {
            saga_id: id.to_string(),
        };
        let r = self
            .inner
            .clone()
            .get_saga_events(self.request(req, CALL_TIMEOUT))
            .await?
            .into_inner();
        Ok(r.events
            .into_iter()
            .map(|e| SagaEvent {
                seq: e.seq,
                at: e.at.and_then(time),
                kind: e.kind,
                step: non_empty(e.step),
                attempt: e.attempt,
                detail: e.detail,
            })
            .collect())
    }

    /// Operator: resume a suspended saga (or hurry a waiting retry).
    pub async fn retry(&self, id: Uuid, note: &str) -> Result<Saga, ClientError> {
        let req = proto::RetrySagaRequest {
            saga_id: id.to_string(),
            note: note.into(),
        };
        Saga::from_proto(
            self.inner
                .clone()
                .retry_saga(self.request(req, CALL_TIMEOUT))
                .await?
                .into_inner()
                .saga,
        )
    }

    /// Operator: force compensation (only before the pivot).
    pub async fn abort(&self, id: Uuid, note: &str) -> Result<Saga, ClientError> {
        let req = proto::AbortSagaRequest {
            saga_id: id.to_string(),
            note: note.into(),
        };
        Saga::from_proto(
            self.inner
                .clone()
                .abort_saga(self.request(req, CALL_TIMEOUT))
                .await?
                .into_inner()
                .saga,
        )
    }

    /// Operator: mark a suspended saga resolved by hand (`note` required).
    pub async fn resolve(&self, id: Uuid, note: &str) -> Result<Saga, ClientError> {
        let req = proto::ResolveSagaRequest {
            saga_id: id.to_string(),
            note: note.into(),
        };
        Saga::from_proto(
            self.inner
                .clone()
                .resolve_saga(self.request(req, CALL_TIMEOUT))
                .await?
                .into_inner()
                .saga,
        )
    }

    /// Announces a participant instance (see [`crate::Participant::register`]);
    /// a zero `ttl` withdraws it.
    pub async fn heartbeat(
        &self,
        participant: &str,
        instance_id: &str,
        endpoint: &str,
        ttl: Duration,
    ) -> Result<(), ClientError> {
        self.heartbeat_weighted(participant, instance_id, endpoint, ttl, 1)
            .await
    }

    /// [`Client::heartbeat`] with the instance's relative share of calls
    /// among the participant's instances (1 to 1000).
    pub async fn heartbeat_weighted(
        &self,
        participant: &str,
        instance_id: &str,
        endpoint: &str,
        ttl: Duration,
        weight: u32,
    ) -> Result<(), ClientError> {
        let req = proto::HeartbeatRequest {
            participant: participant.into(),
            instance_id: instance_id.into(),
            endpoint: endpoint.into(),
            ttl: Some(duration(ttl)),
            weight,
        };
        self.inner
            .clone()
            .heartbeat(self.request(req, CALL_TIMEOUT))
            .await?;
        Ok(())
    }
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

fn time(t: prost_types::Timestamp) -> Option<SystemTime> {
    let secs = u64::try_from(t.seconds).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::new(secs, u32::try_from(t.nanos).ok()?))
}
