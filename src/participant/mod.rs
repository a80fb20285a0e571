//! Calling participants: endpoint resolution, channels, and turning whatever
//! comes back into a domain [`CallResult`].
//!
//! A participant is reached by logical name. Its endpoints are the static ones
//! (`--participant NAME=URL`) plus the live instances registered by
//! heartbeat, cached for a short while. Calls are spread round robin; an
//! endpoint that just answered `UNAVAILABLE` is skipped on the next try while
//! another is available. One channel is kept per endpoint; when a refresh
//! of the registry no longer lists an instance (its heartbeat lapsed, or it
//! withdrew), its channel is dropped, so instances coming and going do not
//! pile up connections. Classification follows DESIGN.md's outcome table to
//! the letter (see [`classify_status`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status};

use crate::domain::{CallResult, Definition, Phase, Saga, StepState};
use crate::proto;
use crate::proto::participant_service_client::ParticipantServiceClient;
use crate::proto::trace::TraceParent;
use crate::store::SagaStore;

/// Longest error text kept from a participant (bytes).
pub const ERROR_BYTES_MAX: usize = 2_048;
/// How long an endpoint that answered `UNAVAILABLE` is passed over.
const UNAVAILABLE_SKIP: Duration = Duration::from_secs(2);

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
}

/// Registered endpoints by participant, with when they were read.
type Discovered = HashMap<String, (Instant, Arc<Vec<String>>)>;

/// Calls participants.
pub struct Participants {
    cfg: CallerConfig,
    store: Arc<dyn SagaStore>,
    clients: Mutex<HashMap<String, ParticipantServiceClient<Channel>>>,
    discovered: Mutex<Discovered>,
    unavailable: Mutex<HashMap<String, Instant>>,
    next: AtomicUsize,
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
    /// The call's own `traceparent` when its span is recorded; else the
    /// saga's context (if any) is passed on as it is.
    pub traceparent: Option<String>,
}

/// Makes one call of a step's handler. The worker reaches participants
/// only through this; [`Participants`] (gRPC) is the implementation `sagad`
/// runs with.
#[async_trait::async_trait]
pub trait StepCaller: Send + Sync + 'static {
    /// Invokes one handler and classifies the result. Never fails: every
    /// failure is a [`CallResult`].
    async fn invoke(&self, inv: Invocation<'_>) -> CallResult;
}

#[async_trait::async_trait]
impl StepCaller for Participants {
    async fn invoke(&self, inv: Invocation<'_>) -> CallResult {
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
            cfg,
            store,
            clients: Mutex::new(HashMap::new()),
            discovered: Mutex::new(HashMap::new()),
            unavailable: Mutex::new(HashMap::new()),
            next: AtomicUsize::new(0),
        })
    }

    /// Invokes one handler and classifies the result. Never fails: every
    /// failure is a [`CallResult`].
    pub async fn invoke(&self, inv: Invocation<'_>) -> CallResult {
        let Some(sd) = inv.def.steps.get(inv.step) else {
            return CallResult::Misconfigured(format!("definition has no step {}", inv.step));
        };
        let handler = match inv.phase {
            Phase::Action => sd.action.clone(),
            Phase::Compensation => match &sd.compensation {
                Some(c) => c.clone(),
                None => {
                    return CallResult::Misconfigured(format!(
                        "step {:?} has no compensation",
                        sd.name
                    ))
                }
            },
        };
        let endpoint = match self.pick(&sd.participant).await {
            Ok(e) => e,
            Err(result) => return result,
        };
        let mut client = match self.client(&endpoint) {
            Ok(c) => c,
            Err(e) => {
                return CallResult::Misconfigured(format!(
                    "participant {:?} endpoint {endpoint:?}: {e}",
                    sd.participant
                ))
            }
        };
        let mut request = tonic::Request::new(build_request(&inv, handler));
        request.set_timeout(inv.timeout);
        if let Some(token) = &self.cfg.token {
            request
                .metadata_mut()
                .insert("authorization", token.clone());
        }
        propagate_trace(&inv, request.metadata_mut());
        let started = Instant::now();
        let answer = tokio::time::timeout(inv.timeout, client.invoke(request)).await;
        // tonic's own deadline (grpc-timeout: CANCELLED) races with ours:
        // either way, the attempt ran out of time.
        let out_of_time = started.elapsed() >= inv.timeout;
        let answer = match answer {
            Err(_) => None,
            Ok(Err(_)) if out_of_time => None,
            Ok(r) => Some(r),
        };
        match answer {
            None => CallResult::Transient(format!(
                "DEADLINE_EXCEEDED: no answer within {:?}",
                inv.timeout
            )),
            Some(Err(status)) => {
                if status.code() == Code::Unavailable {
                    lock(&self.unavailable).insert(endpoint, Instant::now());
                }
                classify_status(&status)
            }
            Some(Ok(response)) => classify_response(response.into_inner(), &self.cfg.json),
        }
    }

    /// Chooses an endpoint: round robin over the live ones, passing over
    /// those that just answered `UNAVAILABLE` while others remain.
    async fn pick(&self, participant: &str) -> Result<String, CallResult> {
        let mut all: Vec<String> = self
            .cfg
            .statics
            .get(participant)
            .cloned()
            .unwrap_or_default();
        let discovered = self.discovered(participant).await?;
        all.extend(
            discovered
                .iter()
                .filter(|e| !all.contains(e))
                .cloned()
                .collect::<Vec<_>>(),
        );
        if all.is_empty() {
            return Err(CallResult::Transient(format!(
                "UNAVAILABLE: no live instance of participant {participant:?}"
            )));
        }
        let healthy: Vec<&String> = {
            let mut down = lock(&self.unavailable);
            down.retain(|_, at| at.elapsed() < UNAVAILABLE_SKIP);
            all.iter().filter(|e| !down.contains_key(*e)).collect()
        };
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        Ok(if healthy.is_empty() {
            all[n % all.len()].clone()
        } else {
            healthy[n % healthy.len()].clone()
        })
    }

    async fn discovered(&self, participant: &str) -> Result<Arc<Vec<String>>, CallResult> {
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
            let gone: Vec<&String> = before.iter().filter(|e| !eps.contains(e)).collect();
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
                    .any(|(_, eps)| eps.contains(e))
        };
        let dead: Vec<&String> = gone.iter().copied().filter(|e| !still_listed(e)).collect();
        let mut clients = lock(&self.clients);
        for e in &dead {
            clients.remove(*e);
        }
        drop(clients);
        let mut down = lock(&self.unavailable);
        for e in &dead {
            down.remove(*e);
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
