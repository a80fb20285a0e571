//! Participants: named handlers for actions and compensations, served as
//! `saga.v1.ParticipantService`.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use futures::FutureExt;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::client::{Client, ClientError};
use crate::proto;
use crate::proto::participant_service_server::{ParticipantService, ParticipantServiceServer};

/// Which handler of a step is called.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// The step's action.
    Action,
    /// The step's compensation.
    Compensation,
}

/// Everything a handler knows about the call.
#[derive(Debug, Clone, PartialEq)]
pub struct StepContext {
    /// The saga.
    pub saga_id: Uuid,
    /// The saga's definition name.
    pub definition: String,
    /// The step.
    pub step: String,
    /// Action or compensation.
    pub phase: Phase,
    /// The handler name called.
    pub handler: String,
    /// Attempt of this phase, from 1.
    pub attempt: u32,
    /// `saga_id/step/phase`: the same on every attempt.
    pub idempotency_key: String,
    /// The saga's input (JSON text).
    pub input_json: String,
    /// Outputs of earlier steps by step name (JSON text).
    pub outputs_json: HashMap<String, String>,
    /// For a compensation: its action's output, if the action succeeded.
    pub action_output_json: Option<String>,
    /// When the coordinator stops waiting for this call.
    pub deadline: Option<SystemTime>,
    /// When the call had to arrive by (the coordinator's lease covers
    /// arrivals until then); a later call is refused unrun.
    pub arrive_by: Option<SystemTime>,
    /// The epoch of the coordinator's lease on the saga: it grows with
    /// every takeover, so a saga's calls arrive with epochs that never go
    /// down (0: not sent).
    pub lease_epoch: u64,
}

impl StepContext {
    /// The saga's input as `T`; a mismatch is a contract error.
    pub fn input<T: DeserializeOwned>(&self) -> Result<T, StepError> {
        serde_json::from_str(&self.input_json)
            .map_err(|e| StepError::Contract(format!("saga input: {e}")))
    }

    /// The output of the earlier step `step`, if it produced one.
    pub fn output<T: DeserializeOwned>(&self, step: &str) -> Result<Option<T>, StepError> {
        self.outputs_json
            .get(step)
            .map(|o| {
                serde_json::from_str(o)
                    .map_err(|e| StepError::Contract(format!("output of {step}: {e}")))
            })
            .transpose()
    }

    /// For a compensation: its action's output, if any.
    pub fn action_output<T: DeserializeOwned>(&self) -> Result<Option<T>, StepError> {
        self.action_output_json
            .as_deref()
            .map(|o| {
                serde_json::from_str(o)
                    .map_err(|e| StepError::Contract(format!("action output: {e}")))
            })
            .transpose()
    }

    fn from_request(r: proto::InvokeRequest) -> Result<StepContext, Status> {
        let phase = match proto::Phase::try_from(r.phase) {
            Ok(proto::Phase::Action) => Phase::Action,
            Ok(proto::Phase::Compensation) => Phase::Compensation,
            _ => {
                return Err(Status::invalid_argument(format!(
                    "phase: {} is not a phase",
                    r.phase
                )))
            }
        };
        let saga_id = Uuid::parse_str(&r.saga_id).map_err(|_| {
            Status::invalid_argument(format!("saga_id: {:?} is not a UUID", r.saga_id))
        })?;
        let time = |t: prost_types::Timestamp| {
            let secs = u64::try_from(t.seconds).ok()?;
            Some(SystemTime::UNIX_EPOCH + Duration::new(secs, u32::try_from(t.nanos).ok()?))
        };
        let deadline = r.deadline.and_then(time);
        let arrive_by = r.arrive_by.and_then(time);
        Ok(StepContext {
            saga_id,
            definition: r.definition,
            step: r.step,
            phase,
            handler: r.handler,
            attempt: r.attempt,
            idempotency_key: r.idempotency_key,
            input_json: if r.input_json.is_empty() {
                "null".into()
            } else {
                r.input_json
            },
            outputs_json: r.outputs_json,
            action_output_json: (!r.action_output_json.is_empty()).then_some(r.action_output_json),
            deadline,
            arrive_by,
            lease_epoch: r.lease_epoch,
        })
    }
}

/// How a handler says it did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// A business refusal: nothing took effect and nothing will
    /// (`OUTCOME_FAILED`). An action's refusal compensates the earlier steps.
    #[error("refused: {0}")]
    Refused(String),
    /// Not now, and nothing took effect: call again later with the same key
    /// (`OUTCOME_RETRY`).
    #[error("retry later: {0}")]
    RetryLater(String),
    /// Something went wrong and the effect is unknown (answered as
    /// `UNAVAILABLE`: the coordinator retries idempotent steps).
    #[error("outcome unknown: {0}")]
    Unknown(String),
    /// The call does not fit the handler (input of the wrong shape):
    /// `INVALID_ARGUMENT`, which suspends the saga for an operator.
    #[error("contract: {0}")]
    Contract(String),
    /// Any other gRPC status, for full control (boxed: `Status` is large).
    #[error("status: {0}")]
    Status(Box<Status>),
}

impl StepError {
    /// A business refusal.
    pub fn refuse(msg: impl Into<String>) -> Self {
        StepError::Refused(msg.into())
    }

    /// Not now, nothing done.
    pub fn retry_later(msg: impl Into<String>) -> Self {
        StepError::RetryLater(msg.into())
    }

    /// Effect unknown.
    pub fn unknown(msg: impl Into<String>) -> Self {
        StepError::Unknown(msg.into())
    }
}

type HandlerFn =
    Arc<dyn Fn(StepContext) -> BoxFuture<'static, Result<String, StepError>> + Send + Sync>;

/// Builds a [`Participant`].
pub struct ParticipantBuilder {
    name: String,
    actions: HashMap<String, HandlerFn>,
    compensations: HashMap<String, HandlerFn>,
    token: Option<String>,
}

impl ParticipantBuilder {
    /// Registers an action: `f(context, saga input) -> output`.
    pub fn action<I, O, F, Fut>(mut self, handler: impl Into<String>, f: F) -> Self
    where
        I: DeserializeOwned + Send + 'static,
        O: Serialize + Send + 'static,
        F: Fn(StepContext, I) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, StepError>> + Send + 'static,
    {
        let f = Arc::new(f);
        let h: HandlerFn = Arc::new(move |ctx: StepContext| {
            let f = f.clone();
            async move {
                let input: I = ctx.input()?;
                let out = f(ctx, input).await?;
                serde_json::to_string(&out)
                    .map_err(|e| StepError::Unknown(format!("serializing the output: {e}")))
            }
            .boxed()
        });
        self.actions.insert(handler.into(), h);
        self
    }

    /// Registers a compensation: `f(context, saga input, action output)`.
    /// It may be called for an action that never ran (then the action output
    /// is `None`) and must succeed then too; [`crate::barrier`] does that.
    pub fn compensation<I, A, F, Fut>(mut self, handler: impl Into<String>, f: F) -> Self
    where
        I: DeserializeOwned + Send + 'static,
        A: DeserializeOwned + Send + 'static,
        F: Fn(StepContext, I, Option<A>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), StepError>> + Send + 'static,
    {
        let f = Arc::new(f);
        let h: HandlerFn = Arc::new(move |ctx: StepContext| {
            let f = f.clone();
            async move {
                let input: I = ctx.input()?;
                let action_output: Option<A> = ctx.action_output()?;
                f(ctx, input, action_output).await?;
                Ok(String::new())
            }
            .boxed()
        });
        self.compensations.insert(handler.into(), h);
        self
    }

    /// Accepts calls only with `authorization: Bearer <token>`: the token
    /// sagad sends (`--participant-token-file`). Other callers are refused
    /// with `UNAUTHENTICATED` before any handler runs.
    pub fn require_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into().trim().to_owned());
        self
    }

    /// The participant.
    pub fn build(self) -> Participant {
        Participant {
            inner: Arc::new(Inner {
                name: self.name,
                actions: self.actions,
                compensations: self.compensations,
                token: self.token,
            }),
        }
    }
}

struct Inner {
    name: String,
    actions: HashMap<String, HandlerFn>,
    compensations: HashMap<String, HandlerFn>,
    token: Option<String>,
}

/// A participant: a logical service name and its handlers. Cheap to clone.
#[derive(Clone)]
pub struct Participant {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Participant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Participant")
            .field("name", &self.inner.name)
            .field("actions", &self.inner.actions.keys().collect::<Vec<_>>())
            .field(
                "compensations",
                &self.inner.compensations.keys().collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Participant {
    /// Starts a participant called `name` (the `participant` of its steps).
    pub fn builder(name: impl Into<String>) -> ParticipantBuilder {
        ParticipantBuilder {
            name: name.into(),
            actions: HashMap::new(),
            compensations: HashMap::new(),
            token: None,
        }
    }

    /// The logical name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The gRPC service, to add to a tonic server beside the service's own.
    pub fn service(&self) -> ParticipantServiceServer<Participant> {
        ParticipantServiceServer::new(self.clone())
    }

    /// Serves only this participant on `listener` until `shutdown`.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), tonic::transport::Error> {
        tonic::transport::Server::builder()
            .add_service(self.service())
            .serve_with_incoming_shutdown(incoming(listener), shutdown)
            .await
    }

    /// [`Participant::serve`] over TLS: with `tls.client_ca_pem`, only
    /// callers presenting a certificate signed by that CA (sagad's
    /// `--participant-cert`) complete the handshake.
    pub async fn serve_tls(
        self,
        listener: tokio::net::TcpListener,
        tls: ServerTls,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), tonic::transport::Error> {
        use tonic::transport::{Certificate, Identity, ServerTlsConfig};
        let mut config =
            ServerTlsConfig::new().identity(Identity::from_pem(tls.cert_pem, tls.key_pem));
        if let Some(ca) = tls.client_ca_pem {
            config = config.client_ca_root(Certificate::from_pem(ca));
        }
        tonic::transport::Server::builder()
            .tls_config(config)?
            .add_service(self.service())
            .serve_with_incoming_shutdown(incoming(listener), shutdown)
            .await
    }

    /// Announces `endpoint` (where this participant is served, e.g.
    /// `http://127.0.0.1:7001`) to each coordinator now and then every
    /// `options.every`, under a fresh instance id. Fails if no coordinator
    /// accepts the first announcement.
    pub async fn register(
        &self,
        coordinators: impl IntoIterator<Item = Client>,
        endpoint: impl Into<String>,
        options: RegisterOptions,
    ) -> Result<Registration, ClientError> {
        let beat = Beat {
            participant: self.inner.name.clone(),
            instance_id: format!("{}-{}", self.inner.name, Uuid::new_v4()),
            endpoint: endpoint.into(),
        };
        let clients: Vec<Client> = coordinators.into_iter().collect();
        let mut first_err = None;
        let mut accepted = 0;
        for c in &clients {
            match c
                .heartbeat_weighted(
                    &beat.participant,
                    &beat.instance_id,
                    &beat.endpoint,
                    options.ttl,
                    options.weight,
                )
                .await
            {
                Ok(()) => accepted += 1,
                Err(e) => first_err = first_err.or(Some(e)),
            }
        }
        if accepted == 0 {
            return Err(first_err
                .unwrap_or_else(|| ClientError::InvalidArgument("no coordinator given".into())));
        }
        let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
        let instance_id = beat.instance_id.clone();
        let endpoint_copy = beat.endpoint.clone();
        let task_clients = clients.clone();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = &mut stop_rx => return,
                    _ = tokio::time::sleep(options.every) => {}
                }
                for c in &task_clients {
                    if let Err(error) = c
                        .heartbeat_weighted(
                            &beat.participant,
                            &beat.instance_id,
                            &beat.endpoint,
                            options.ttl,
                            options.weight,
                        )
                        .await
                    {
                        tracing::warn!(%error, participant = %beat.participant, "heartbeat failed");
                    }
                }
            }
        });
        Ok(Registration {
            participant: self.inner.name.clone(),
            endpoint: endpoint_copy,
            instance_id,
            clients,
            stop: Some(stop_tx),
            task: Some(task),
        })
    }

    async fn call(
        &self,
        r: proto::InvokeRequest,
        md: &tonic::metadata::MetadataMap,
    ) -> Result<proto::InvokeResponse, Status> {
        let ctx = StepContext::from_request(r)?;
        // A call that arrives after its arrival limit is not run: the
        // coordinator's lease on the saga covered arrivals only until then,
        // so another coordinator may be driving the saga (a coordinator
        // paused between deciding and sending). Older coordinators send only
        // the deadline, which their lease outlived.
        let limit = ctx.arrive_by.or(ctx.deadline);
        if limit.is_some_and(|d| SystemTime::now() > d) {
            return Err(Status::deadline_exceeded(
                "the call arrived after its deadline; not run",
            ));
        }
        let handlers = match ctx.phase {
            Phase::Action => &self.inner.actions,
            Phase::Compensation => &self.inner.compensations,
        };
        let Some(h) = handlers.get(&ctx.handler).cloned() else {
            let kind = if ctx.phase == Phase::Action {
                "action"
            } else {
                "compensation"
            };
            return Err(Status::unimplemented(format!(
                "participant {:?} has no {kind} handler {:?}",
                self.inner.name, ctx.handler
            )));
        };
        let (key, handler) = (ctx.idempotency_key.clone(), ctx.handler.clone());
        let span = handler_span(&ctx, md);
        // A panicking handler answers INTERNAL (outcome unknown) and the
        // participant keeps serving.
        let run = AssertUnwindSafe(h(ctx)).catch_unwind();
        let result = match opentelemetry::trace::FutureExt::with_context(run, span.clone()).await {
            Ok(r) => r,
            Err(_) => {
                tracing::error!(%handler, %key, "handler panicked");
                crate::trace::end(&span, "unknown", Some("handler panicked"));
                return Err(Status::internal(format!("handler {handler:?} panicked")));
            }
        };
        let (outcome, error) = match &result {
            Ok(_) => ("succeeded", None),
            Err(StepError::Refused(_)) => ("failed", None),
            Err(StepError::RetryLater(_)) => ("retry", None),
            Err(StepError::Unknown(m)) | Err(StepError::Contract(m)) => ("error", Some(m.as_str())),
            Err(StepError::Status(s)) => ("error", Some(s.message())),
        };
        crate::trace::end(&span, outcome, error);
        let answer =
            |outcome: proto::Outcome, output_json: String, error: String| proto::InvokeResponse {
                outcome: outcome as i32,
                output_json,
                error,
            };
        match result {
            Ok(output) => Ok(answer(proto::Outcome::Succeeded, output, String::new())),
            Err(StepError::Refused(m)) => Ok(answer(proto::Outcome::Failed, String::new(), m)),
            Err(StepError::RetryLater(m)) => Ok(answer(proto::Outcome::Retry, String::new(), m)),
            Err(StepError::Unknown(m)) => Err(Status::unavailable(m)),
            Err(StepError::Contract(m)) => Err(Status::invalid_argument(m)),
            Err(StepError::Status(s)) => Err(*s),
        }
    }
}

#[tonic::async_trait]
impl ParticipantService for Participant {
    async fn invoke(
        &self,
        request: Request<proto::InvokeRequest>,
    ) -> Result<Response<proto::InvokeResponse>, Status> {
        if let Some(token) = &self.inner.token {
            let given = request
                .metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            if !given.is_some_and(|g| same_secret(g, token)) {
                return Err(Status::unauthenticated(
                    "this participant accepts calls from sagad only: missing or wrong authorization",
                ));
            }
        }
        let (md, _, message) = request.into_parts();
        self.call(message, &md).await.map(Response::new)
    }
}

/// The span a handler runs in: "action reserve", a child of sagad's span
/// for the attempt.
fn handler_span(ctx: &StepContext, md: &tonic::metadata::MetadataMap) -> opentelemetry::Context {
    use opentelemetry::KeyValue;
    let phase = match ctx.phase {
        Phase::Action => "action",
        Phase::Compensation => "compensation",
    };
    crate::trace::handler_context(
        md,
        format!("{phase} {}", ctx.step),
        vec![
            KeyValue::new("saga.id", ctx.saga_id.to_string()),
            KeyValue::new("saga.definition", ctx.definition.clone()),
            KeyValue::new("saga.step", ctx.step.clone()),
            KeyValue::new("saga.phase", phase),
            KeyValue::new("saga.handler", ctx.handler.clone()),
            KeyValue::new("saga.attempt", i64::from(ctx.attempt)),
        ],
    )
}

/// Compares secrets in time independent of where they differ.
fn same_secret(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// How often to announce, and for how long each announcement holds.
#[derive(Debug, Clone, Copy)]
pub struct RegisterOptions {
    /// Time between announcements.
    pub every: Duration,
    /// How long the coordinator keeps the instance alive after one.
    pub ttl: Duration,
    /// This instance's relative share of calls among the participant's
    /// instances (1 to 1000; coordinators spread calls by it).
    pub weight: u32,
}

impl Default for RegisterOptions {
    fn default() -> Self {
        RegisterOptions {
            every: Duration::from_secs(3),
            ttl: Duration::from_secs(10),
            weight: 1,
        }
    }
}

struct Beat {
    participant: String,
    instance_id: String,
    endpoint: String,
}

/// A running registration; [`Registration::stop`] withdraws it.
#[derive(Debug)]
pub struct Registration {
    participant: String,
    endpoint: String,
    instance_id: String,
    clients: Vec<Client>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Registration {
    /// This process's instance id.
    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    /// Stops announcing and withdraws the instance (a zero-TTL heartbeat),
    /// so coordinators stop calling it at once.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        for c in &self.clients {
            if let Err(error) = c
                .heartbeat(
                    &self.participant,
                    &self.instance_id,
                    &self.endpoint,
                    Duration::ZERO,
                )
                .await
            {
                tracing::warn!(%error, "withdrawing the registration failed; it expires with its ttl");
            }
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// TLS for a participant's own server.
#[derive(Clone)]
pub struct ServerTls {
    /// Its certificate chain (PEM).
    pub cert_pem: String,
    /// Its private key (PEM).
    pub key_pem: String,
    /// Require callers to present a certificate signed by this CA (PEM).
    pub client_ca_pem: Option<String>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("client_ca", &self.client_ca_pem.is_some())
            .finish_non_exhaustive()
    }
}

/// Accepted sockets with TCP_NODELAY: a plain listener stream leaves
/// Nagle's algorithm on, and small replies then wait for ACKs.
fn incoming(
    listener: tokio::net::TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt;
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(|conn| {
        if let Ok(c) = &conn {
            let _ = c.set_nodelay(true);
        }
        conn
    })
}

/// Binds `127.0.0.1:0`, serves `participant` there until `shutdown`, and
/// returns the address: handy for tests and examples.
pub async fn serve_local(
    participant: Participant,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<(SocketAddr, JoinHandle<Result<(), tonic::transport::Error>>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    Ok((addr, tokio::spawn(participant.serve(listener, shutdown))))
}
