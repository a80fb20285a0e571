//! Calling participants: endpoint resolution, channels, and turning whatever
//! comes back into a domain [`CallResult`].
//!
//! A participant is reached by logical name. Its endpoints are the static ones
//! (`--participant NAME=URL`) plus the live instances registered by
//! heartbeat, cached for a short while. How calls are spread over them, and
//! held back when a participant has enough, is [`balance`]'s: round robin or
//! least outstanding per participant, a circuit breaker per instance, an
//! in-flight cap and a rate limit per participant; an attempt that does not
//! reach an instance at all goes to another. One channel is kept per endpoint; when a refresh
//! of the registry no longer lists an instance (its heartbeat lapsed, or it
//! withdrew), its channel is dropped, so instances coming and going do not
//! pile up connections. Classification follows DESIGN.md's outcome table to
//! the letter (see [`classify_status`]).

pub mod balance;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status};

use balance::Balancer;
pub use balance::{BalanceConfig, Policy, PoolSnapshot};

use crate::domain::{CallResult, Definition, Phase, Saga, StepState};
use crate::proto;
use crate::proto::participant_service_client::ParticipantServiceClient;
use crate::proto::trace::TraceParent;
use crate::store::SagaStore;

/// Longest error text kept from a participant (bytes).
pub const ERROR_BYTES_MAX: usize = 2_048;

/// Settings of the participant caller.
#[derive(Debug, Clone)]
pub struct CallerConfig {
    /// Static endpoints by participant name.
    pub statics: HashMap<String, Vec<String>>,
    /// How long registered endpoints are cached.
    pub discovery_cache: Duration,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Largest and deepest accepted output.
    pub json: crate::domain::JsonLimits,
    /// TLS towards `https://` endpoints: the CA to verify them with (else
    /// the system's roots) and sagad's client certificate, if any.
    pub tls: ClientTlsConfig,
    /// Refuse plaintext (`http://`) endpoints (`--require-participant-tls`).
    pub require_tls: bool,
    /// Sent as `authorization: Bearer <token>` with every call, so that
    /// participants can tell it is sagad calling (marked sensitive: never
    /// printed).
    pub token: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
    /// Balancing, breakers and back-pressure.
    pub balance: BalanceConfig,
}

/// Registered endpoints by participant, with when they were read.
type Discovered = HashMap<String, (Instant, Arc<Vec<(String, u32)>>)>;

/// Calls participants.
pub struct Participants {
    cfg: CallerConfig,
    store: Arc<dyn SagaStore>,
    clients: Mutex<HashMap<String, ParticipantServiceClient<Channel>>>,
    discovered: Mutex<Discovered>,
    balancer: Balancer,
}

/// What to send to a participant.
#[derive(Debug, Clone)]
pub struct Invocation<'a> {
    /// The saga.
    pub saga: &'a Saga,
    /// Its definition.
    pub def: &'a Definition,
    /// Step index.
    pub step: usize,
    /// Which handler.
    pub phase: Phase,
    /// Attempt number of the phase.
    pub attempt: u32,
    /// How long to wait for the answer.
    pub timeout: Duration,
    /// When the coordinator stops waiting (database clock).
    pub deadline: DateTime<Utc>,
    /// When the call must have reached the participant (database clock).
    pub arrive_by: DateTime<Utc>,
    /// The epoch of the lease the call is made under.
    pub lease_epoch: i64,
    /// `arrive_by` on this process's clock, less a moment for the trip: a
    /// call that waited for capacity until then is not sent.
    pub send_by: Instant,
    /// The call's own `traceparent` when its span is recorded; else the
    /// saga's context (if any) is passed on as it is.
    pub traceparent: Option<String>,
}

/// Makes one call of a step's handler. The worker reaches participants
/// only through this; [`Participants`] (gRPC) is the implementation `sagad`
/// runs with.
#[async_trait::async_trait]
pub trait StepCaller: Send + Sync + 'static {
    /// Invokes one handler and classifies the result: every failure is a
    /// [`CallResult`]. `None`: not sent — the participant had no capacity
    /// (in-flight cap, rate limit) before the call's `send_by`; nothing
    /// reached it, and no attempt counts.
    async fn invoke(&self, inv: Invocation<'_>) -> Option<CallResult>;
}

#[async_trait::async_trait]
impl StepCaller for Participants {
    async fn invoke(&self, inv: Invocation<'_>) -> Option<CallResult> {
        Participants::invoke(self, inv).await
    }
}

impl Participants {
    /// A caller; checks that every static endpoint is a valid URL.
    pub fn new(cfg: CallerConfig, store: Arc<dyn SagaStore>) -> Result<Self, String> {
        for (name, urls) in &cfg.statics {
            for url in urls {
                check_endpoint(url)
                    .and_then(|_| check_tls(url, cfg.require_tls))
                    .map_err(|e| format!("--participant {name}={url}: {e}"))?;
            }
        }
        Ok(Participants {
            store,
            clients: Mutex::new(HashMap::new()),
            discovered: Mutex::new(HashMap::new()),
            balancer: Balancer::new(cfg.balance.clone()),
            cfg,
        })
    }

    /// Invokes one handler and classifies the result (see
    /// [`StepCaller::invoke`]): waits for the participant's capacity, picks
    /// an instance (see `balance`), and sends the same attempt to another
    /// instance when one is not reached at all.
    pub async fn invoke(&self, inv: Invocation<'_>) -> Option<CallResult> {
        let Some(sd) = inv.def.steps.get(inv.step) else {
            return Some(CallResult::Misconfigured(format!(
                "definition has no step {}",
                inv.step
            )));
        };
        let handler = match inv.phase {
            Phase::Action => sd.action.clone(),
            Phase::Compensation => match &sd.compensation {
                Some(c) => c.clone(),
                None => {
                    let why = format!("step {:?} has no compensation", sd.name);
                    return Some(CallResult::Misconfigured(why));
                }
            },
        };
        let endpoints = match self.endpoints(&sd.participant).await {
            Ok(e) => e,
            Err(result) => return Some(result),
        };
        let pool = self.balancer.pool(&sd.participant);
        let _admitted = pool.admit(inv.send_by).await?;
        let mut request = build_request(&inv, handler);
        let started = Instant::now();
        let mut tried: Vec<String> = Vec::new();
        let instances = endpoints.len();
        loop {
            let Some(instance) = pool.pick(&endpoints, &tried) else {
                return Some(CallResult::Transient(format!(
                    "UNAVAILABLE: no instance of participant {:?} can be reached (circuit breakers open)",
                    sd.participant
                )));
            };
            let left = inv.timeout.saturating_sub(started.elapsed());
            // The request is copied only while another instance may still
            // take it (the payload can be large).
            let body = if tried.len() + 1 < instances {
                request.clone()
            } else {
                std::mem::take(&mut request)
            };
            let _outstanding = instance.begin();
            match self.call(&instance.endpoint, &inv, body, left).await {
                Sent::Reached(result) => {
                    pool.reached(&instance);
                    return Some(result);
                }
                Sent::Unreached(result) => {
                    pool.unreached(&instance);
                    tried.push(instance.endpoint.clone());
                    let more = tried.len() < instances && Instant::now() < inv.send_by;
                    if !more {
                        return Some(result);
                    }
                    pool.rerouted();
                }
            }
        }
    }

    /// One call to one endpoint, within `timeout`.
    async fn call(
        &self,
        endpoint: &str,
        inv: &Invocation<'_>,
        request: proto::InvokeRequest,
        timeout: Duration,
    ) -> Sent {
        let participant = &inv.def.steps[inv.step].participant;
        let mut client = match self.client(endpoint) {
            Ok(c) => c,
            Err(e) => {
                return Sent::Reached(CallResult::Misconfigured(format!(
                    "participant {participant:?} endpoint {endpoint:?}: {e}"
                )))
            }
        };
        let mut request = tonic::Request::new(request);
        request.set_timeout(timeout);
        if let Some(token) = &self.cfg.token {
            request
                .metadata_mut()
                .insert("authorization", token.clone());
        }
        propagate_trace(inv, request.metadata_mut());
        let started = Instant::now();
        let answer = tokio::time::timeout(timeout, client.invoke(request)).await;
        // tonic's own deadline (grpc-timeout: CANCELLED) races with ours:
        // either way, the attempt ran out of time.
        let out_of_time = started.elapsed() >= timeout;
        match answer {
            Err(_) | Ok(Err(_)) if out_of_time => Sent::Reached(CallResult::Transient(format!(
                "DEADLINE_EXCEEDED: no answer within {:?}",
                inv.timeout
            ))),
            Ok(Err(status)) if unreached(&status) => Sent::Unreached(classify_status(&status)),
            Ok(Err(status)) => Sent::Reached(classify_status(&status)),
            Ok(Ok(response)) => {
                Sent::Reached(classify_response(response.into_inner(), &self.cfg.json))
            }
            Err(_) => Sent::Reached(CallResult::Transient("DEADLINE_EXCEEDED".into())),
        }
    }

    /// The endpoints of `participant` with their weights: static ones
    /// (weight 1), then registered ones.
    async fn endpoints(&self, participant: &str) -> Result<Vec<(String, u32)>, CallResult> {
        let mut all: Vec<(String, u32)> = self
            .cfg
            .statics
            .get(participant)
            .map(|urls| urls.iter().map(|u| (u.clone(), 1)).collect())
            .unwrap_or_default();
        let discovered = self.discovered(participant).await?;
        for (url, weight) in discovered.iter() {
            if !all.iter().any(|(u, _)| u == url) {
                all.push((url.clone(), *weight));
            }
        }
        if all.is_empty() {
            return Err(CallResult::Transient(format!(
                "UNAVAILABLE: no live instance of participant {participant:?}"
            )));
        }
        Ok(all)
    }

    /// Every participant's balancing state, for `/metrics` and the admin
    /// page.
    pub fn pools(&self) -> Vec<PoolSnapshot> {
        self.balancer.pools().iter().map(|p| p.snapshot()).collect()
    }

    async fn discovered(&self, participant: &str) -> Result<Arc<Vec<(String, u32)>>, CallResult> {
        if let Some((at, eps)) = lock(&self.discovered).get(participant) {
            if at.elapsed() < self.cfg.discovery_cache {
                return Ok(eps.clone());
            }
        }
        let eps = self
            .store
            .participant_endpoints(participant)
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, participant, "participant registry lookup failed");
                CallResult::Transient("UNAVAILABLE: participant registry unavailable".into())
            })?;
        let eps = Arc::new(eps);
        let before =
            lock(&self.discovered).insert(participant.to_owned(), (Instant::now(), eps.clone()));
        if let Some((_, before)) = before {
            let listed = |url: &String| eps.iter().any(|(u, _)| u == url);
            let gone: Vec<&String> = before
                .iter()
                .map(|(u, _)| u)
                .filter(|u| !listed(u))
                .collect();
            if !gone.is_empty() {
                self.forget(&gone);
            }
        }
        Ok(eps)
    }

    /// Drops the channels of endpoints that are no longer live: neither
    /// static nor listed for any participant.
    fn forget(&self, gone: &[&String]) {
        let still_listed = |e: &String| {
            self.cfg.statics.values().any(|urls| urls.contains(e))
                || lock(&self.discovered)
                    .values()
                    .any(|(_, eps)| eps.iter().any(|(u, _)| u == e))
        };
        let dead: Vec<&String> = gone.iter().copied().filter(|e| !still_listed(e)).collect();
        let mut clients = lock(&self.clients);
        for e in &dead {
            clients.remove(*e);
        }
    }

    /// How many participant channels are open (one per live endpoint that
    /// has been called).
    pub fn channels(&self) -> usize {
        lock(&self.clients).len()
    }

    fn client(&self, endpoint: &str) -> Result<ParticipantServiceClient<Channel>, String> {
        let mut clients = lock(&self.clients);
        if let Some(c) = clients.get(endpoint) {
            return Ok(c.clone());
        }
        check_tls(endpoint, self.cfg.require_tls)?;
        let mut channel = check_endpoint(endpoint)?
            .connect_timeout(self.cfg.connect_timeout)
            .tcp_nodelay(true);
        if endpoint.starts_with("https://") {
            channel = channel
                .tls_config(self.cfg.tls.clone())
                .map_err(|e| format!("TLS: {e}"))?;
        }
        let channel = channel.connect_lazy();
        let client = ParticipantServiceClient::new(channel)
            .max_decoding_message_size(self.cfg.json.bytes_max.saturating_mul(2).max(4 << 20));
        clients.insert(endpoint.to_owned(), client.clone());
        Ok(client)
    }
}

/// How one call to one endpoint went.
enum Sent {
    /// The service was reached (whatever it answered), or the call ran out
    /// of time.
    Reached(CallResult),
    /// The call never reached the service: another instance may take the
    /// same attempt.
    Unreached(CallResult),
}

/// `UNAVAILABLE` with no response from the server: the connection failed
/// before the request reached the service (a server's own status comes with
/// response headers).
fn unreached(status: &Status) -> bool {
    status.code() == Code::Unavailable && status.metadata().get("content-type").is_none()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned map of caches is still a valid map of caches.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// With `require_tls`, refuses a plaintext endpoint (`--require-participant-tls`).
pub fn check_tls(url: &str, require_tls: bool) -> Result<(), String> {
    if require_tls && !url.starts_with("https://") {
        return Err(
            "plaintext endpoints are refused: sagad requires TLS to participants \
             (--require-participant-tls); use https://"
                .into(),
        );
    }
    Ok(())
}

/// The bearer value for `token` (trimmed), marked sensitive; refuses an
/// empty token or one that is not printable ASCII, without quoting it.
pub fn bearer(
    token: &str,
) -> Result<tonic::metadata::MetadataValue<tonic::metadata::Ascii>, String> {
    let token = token.trim();
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("the token must be non-empty printable ASCII without spaces".into());
    }
    let mut v: tonic::metadata::MetadataValue<tonic::metadata::Ascii> = format!("Bearer {token}")
        .parse()
        .map_err(|_| "the token is not a valid header value".to_owned())?;
    v.set_sensitive(true);
    Ok(v)
}

/// The TLS settings towards participants: `ca` (PEM) verifies them, else
/// the system's roots; `identity` (PEM certificate chain and key) is
/// presented to participants that ask for a client certificate.
pub fn client_tls(ca: Option<&[u8]>, identity: Option<(&[u8], &[u8])>) -> ClientTlsConfig {
    let tls = ClientTlsConfig::new();
    let tls = match ca {
        Some(pem) => tls.ca_certificate(Certificate::from_pem(pem)),
        None => tls.with_native_roots(),
    };
    match identity {
        Some((cert, key)) => tls.identity(Identity::from_pem(cert, key)),
        None => tls,
    }
}

/// Parses a participant endpoint (`http://host:port` or `https://…`).
pub fn check_endpoint(url: &str) -> Result<Endpoint, String> {
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err("must be an http:// or https:// URL".into());
    }
    Endpoint::from_shared(url.to_owned()).map_err(|e| format!("not a valid URL: {e}"))
}

/// Puts the call's trace context on its metadata (see [`Invocation`]).
fn propagate_trace(inv: &Invocation<'_>, md: &mut tonic::metadata::MetadataMap) {
    let Some(trace) = &inv.saga.trace else { return };
    let parent = inv.traceparent.as_deref().unwrap_or(&trace.traceparent);
    if let Some(tp) = TraceParent::parse(parent) {
        tp.to_metadata(md, trace.tracestate.as_deref());
    }
}

fn build_request(inv: &Invocation<'_>, handler: String) -> proto::InvokeRequest {
    let saga = inv.saga;
    let step_name = inv
        .def
        .steps
        .get(inv.step)
        .map(|s| s.name.clone())
        .unwrap_or_default();
    let outputs_json = inv
        .def
        .steps
        .iter()
        .zip(&saga.steps)
        .take(inv.step)
        .filter(|(_, s)| s.state == StepState::Succeeded || s.output.is_some())
        .map(|(d, s)| {
            (
                d.name.clone(),
                s.output.clone().unwrap_or_else(|| "null".into()),
            )
        })
        .collect();
    let action_output_json = match inv.phase {
        Phase::Compensation => saga
            .steps
            .get(inv.step)
            .and_then(|s| s.output.clone())
            .unwrap_or_default(),
        Phase::Action => String::new(),
    };
    let phase = match inv.phase {
        Phase::Action => proto::Phase::Action,
        Phase::Compensation => proto::Phase::Compensation,
    };
    proto::InvokeRequest {
        saga_id: saga.id.to_string(),
        definition: saga.definition.clone(),
        idempotency_key: idempotency_key(saga, &step_name, inv.phase),
        step: step_name,
        phase: phase as i32,
        handler,
        attempt: inv.attempt,
        input_json: saga.input.clone(),
        outputs_json,
        action_output_json,
        deadline: Some(timestamp(inv.deadline)),
        arrive_by: Some(timestamp(inv.arrive_by)),
        lease_epoch: u64::try_from(inv.lease_epoch).unwrap_or(0),
    }
}

fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

/// `saga_id/step/phase`: stable across attempts and coordinators.
pub fn idempotency_key(saga: &Saga, step: &str, phase: Phase) -> String {
    format!("{}/{}/{}", saga.id, step, phase.as_str())
}

/// DESIGN.md's table for gRPC errors: which codes leave the outcome unknown
/// (transient) and which mean a misconfiguration.
pub fn classify_status(status: &Status) -> CallResult {
    let text = clean(&format!(
        "{}: {}",
        proto::status_code_name(status.code()),
        status.message()
    ));
    match status.code() {
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::ResourceExhausted
        | Code::Aborted
        | Code::Cancelled
        | Code::Internal
        | Code::Unknown
        | Code::Ok => CallResult::Transient(text),
        // ALREADY_EXISTS is not in the table; like the other client-error
        // codes it cannot be fixed by retrying, so it is a misconfiguration.
        Code::Unimplemented
        | Code::InvalidArgument
        | Code::NotFound
        | Code::FailedPrecondition
        | Code::OutOfRange
        | Code::PermissionDenied
        | Code::Unauthenticated
        | Code::DataLoss
        | Code::AlreadyExists => CallResult::Misconfigured(text),
    }
}

/// DESIGN.md's table for answers that arrived.
pub fn classify_response(r: proto::InvokeResponse, json: &crate::domain::JsonLimits) -> CallResult {
    match proto::Outcome::try_from(r.outcome) {
        Ok(proto::Outcome::Succeeded) => {
            if r.output_json.is_empty() {
                return CallResult::Succeeded(None);
            }
            match json.check(&r.output_json) {
                Ok(()) => CallResult::Succeeded(Some(r.output_json)),
                Err(why) => CallResult::Misconfigured(format!("output_json {why}")),
            }
        }
        Ok(proto::Outcome::Failed) => CallResult::Failed(message_or(&r.error, "refused")),
        Ok(proto::Outcome::Retry) => {
            CallResult::Retry(message_or(&r.error, "asked to retry later"))
        }
        Ok(proto::Outcome::Unspecified) | Err(_) => CallResult::Misconfigured(format!(
            "response has no valid outcome ({}); the participant breaks the contract",
            r.outcome
        )),
    }
}

fn message_or(error: &str, default: &str) -> String {
    if error.is_empty() {
        default.to_owned()
    } else {
        clean(error)
    }
}

/// Text from outside, made safe to store: no NUL, bounded length.
pub fn clean(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| if c == '\0' { '\u{FFFD}' } else { c })
        .collect();
    if out.len() > ERROR_BYTES_MAX {
        let mut cut = ERROR_BYTES_MAX;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_follow_the_outcome_table() {
        let transient = [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::ResourceExhausted,
            Code::Aborted,
            Code::Cancelled,
            Code::Internal,
            Code::Unknown,
        ];
        let misconfigured = [
            Code::Unimplemented,
            Code::InvalidArgument,
            Code::NotFound,
            Code::FailedPrecondition,
            Code::OutOfRange,
            Code::PermissionDenied,
            Code::Unauthenticated,
            Code::DataLoss,
        ];
        for code in transient {
            assert!(
                matches!(
                    classify_status(&Status::new(code, "x")),
                    CallResult::Transient(_)
                ),
                "{code:?}"
            );
        }
        for code in misconfigured {
            assert!(
                matches!(
                    classify_status(&Status::new(code, "x")),
                    CallResult::Misconfigured(_)
                ),
                "{code:?}"
            );
        }
    }

    const LIMITS: crate::domain::JsonLimits = crate::domain::JsonLimits {
        bytes_max: 10,
        depth_max: 2,
    };

    #[test]
    fn responses_are_checked() {
        let r = |outcome: proto::Outcome, out: &str| proto::InvokeResponse {
            outcome: outcome as i32,
            output_json: out.into(),
            error: String::new(),
        };
        assert_eq!(
            classify_response(r(proto::Outcome::Succeeded, ""), &LIMITS),
            CallResult::Succeeded(None)
        );
        assert_eq!(
            classify_response(r(proto::Outcome::Succeeded, "[1]"), &LIMITS),
            CallResult::Succeeded(Some("[1]".into()))
        );
        assert!(matches!(
            classify_response(r(proto::Outcome::Succeeded, "{"), &LIMITS),
            CallResult::Misconfigured(_)
        ));
        assert!(matches!(
            classify_response(r(proto::Outcome::Succeeded, "[1,2,3,4,5,6]"), &LIMITS),
            CallResult::Misconfigured(_)
        ));
        assert!(matches!(
            classify_response(r(proto::Outcome::Succeeded, "[[[1]]]"), &LIMITS),
            CallResult::Misconfigured(m) if m.contains("nests deeper")
        ));
        assert!(matches!(
            classify_response(r(proto::Outcome::Unspecified, ""), &LIMITS),
            CallResult::Misconfigured(_)
        ));
        assert_eq!(
            classify_response(r(proto::Outcome::Failed, ""), &LIMITS),
            CallResult::Failed("refused".into())
        );
        assert!(matches!(
            classify_response(r(proto::Outcome::Retry, ""), &LIMITS),
            CallResult::Retry(_)
        ));
    }

    #[test]
    fn clean_removes_nul_and_bounds_length() {
        assert_eq!(clean("a\0b"), "a\u{FFFD}b");
        assert!(clean(&"é".repeat(5_000)).len() <= ERROR_BYTES_MAX + 3);
    }
}
