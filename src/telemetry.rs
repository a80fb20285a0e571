//! Distributed traces: where a saga hangs in its caller's trace, and the
//! spans `sagad` exports over OTLP.
//!
//! ```text
//!   caller span (traceparent on StartSaga)
//!     └─ saga <definition>              one span, created_at → settled, emitted
//!          │                             by whichever coordinator settles it
//!          ├─ action reserve            one span per attempt, emitted by the
//!          │    └─ participant's span   coordinator that made the call; its
//!          ├─ action charge  (attempt 1) traceparent goes to the participant
//!          ├─ action charge  (attempt 2) in the call's metadata
//!          └─ compensation reserve
//! ```
//!
//! A saga outlives the process that starts it, so its span cannot be an
//! open span in memory. Instead the API edge fixes the saga span's ids when
//! the saga is created and stores them with it ([`SagaTrace`]); every attempt
//! span names that id as its parent, whichever coordinator makes the call
//! after a crash or a takeover, and the saga span itself is built from the
//! stored ids and times when the saga ends. Spans are therefore assembled
//! here as finished span data, with their own ids and times, and handed to
//! the batch exporter directly rather than through a tracer.
//!
//! With no exporter configured nothing is recorded and no id is made, but a
//! caller's context is still kept and passed on to the participants, so
//! their spans join the caller's trace. The caller's sampled flag is obeyed:
//! an unsampled trace is propagated and never exported.

use std::borrow::Cow;
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::{BatchSpanProcessor, SpanData, SpanProcessor};
use opentelemetry_sdk::Resource;
use saga_proto::trace::{span_id_from_hex, to_hex, TraceParent, FLAG_SAMPLED};

use crate::domain::{CallResult, Definition, Phase, Saga, SagaTrace};

/// Whether spans are exported, and to where.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TelemetryConfig {
    /// The OTLP/gRPC collector (`--otlp-endpoint`, else
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT`);
    /// `None`: no export.
    pub otlp_endpoint: Option<String>,
}

impl TelemetryConfig {
    /// From the flag and the standard environment variables
    /// (`OTEL_SDK_DISABLED=true` turns export off).
    pub fn resolve(flag: Option<&str>) -> TelemetryConfig {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        if env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
            return TelemetryConfig::default();
        }
        let otlp_endpoint = flag
            .map(str::to_owned)
            .or_else(|| env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
            .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"));
        TelemetryConfig { otlp_endpoint }
    }
}

/// `sagad`'s span exporter.
#[derive(Debug)]
pub struct Telemetry {
    processor: BatchSpanProcessor,
    scope: InstrumentationScope,
}

impl Telemetry {
    /// The exporter `cfg` asks for, if any. Must run inside the tokio
    /// runtime (the gRPC channel lives there). The batching follows the
    /// standard `OTEL_BSP_*` variables; the service name is
    /// `OTEL_SERVICE_NAME`, else `sagad`.
    pub fn start(cfg: &TelemetryConfig) -> Result<Option<Telemetry>, String> {
        let Some(endpoint) = &cfg.otlp_endpoint else {
            return Ok(None);
        };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .build()
            // The builder's message may quote the endpoint, which may carry
            // credentials in its user part: say only what is wrong.
            .map_err(|_| {
                "--otlp-endpoint: not a usable OTLP/gRPC endpoint (expected http://host:port \
                 or https://host:port)"
                    .to_owned()
            })?;
        let mut resource = Resource::builder();
        if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
            resource = resource.with_service_name("sagad");
        }
        let mut processor = BatchSpanProcessor::builder(exporter).build();
        processor.set_resource(&resource.build());
        let scope = InstrumentationScope::builder("sagad")
            .with_version(env!("CARGO_PKG_VERSION"))
            .build();
        Ok(Some(Telemetry { processor, scope }))
    }

    /// Sends what is queued and stops the exporter (at shutdown).
    pub fn shutdown(&self) {
        if let Err(error) = self.processor.shutdown_with_timeout(Duration::from_secs(5)) {
            tracing::warn!(%error, "flushing spans at shutdown failed");
        }
    }

    /// Starts the span of one call: its ids and start time. The span is
    /// emitted by [`Telemetry::attempt_end`].
    pub fn attempt_start(&self, saga: &SagaTrace) -> Option<AttemptSpan> {
        let parent = TraceParent::parse(&saga.traceparent)?;
        Some(AttemptSpan {
            own: parent.child(span_id()),
            parent,
            start: SystemTime::now(),
        })
    }

    /// Emits a call's span (if its trace is sampled).
    pub fn attempt_end(&self, span: AttemptSpan, call: &CallSpan<'_>, result: &CallResult) {
        if !span.own.sampled() {
            return;
        }
        let step = &call.def.steps[call.step];
        let (outcome, status) = match result {
            CallResult::Succeeded(_) => ("succeeded", Status::Ok),
            CallResult::Failed(_) => ("failed", Status::Unset),
            CallResult::Retry(_) => ("retry", Status::Unset),
            CallResult::Transient(e) => ("unknown", error_status(e)),
            CallResult::Misconfigured(e) => ("misconfigured", error_status(e)),
        };
        let attributes = vec![
            KeyValue::new("saga.id", call.saga.id.to_string()),
            KeyValue::new("saga.definition", call.saga.definition.clone()),
            KeyValue::new("saga.step", step.name.clone()),
            KeyValue::new("saga.phase", call.phase.to_string()),
            KeyValue::new("saga.attempt", i64::from(call.attempt)),
            KeyValue::new("saga.participant", step.participant.clone()),
            KeyValue::new("saga.outcome", outcome),
            KeyValue::new("rpc.system", "grpc"),
            KeyValue::new("rpc.service", "saga.v1.ParticipantService"),
            KeyValue::new("rpc.method", "Invoke"),
        ];
        self.emit(Finished {
            name: format!("{} {}", call.phase, step.name).into(),
            kind: SpanKind::Client,
            own: span.own,
            parent: Some(span.parent.span_id),
            state: call
                .saga
                .trace
                .as_ref()
                .and_then(|t| t.tracestate.as_deref()),
            start: span.start,
            end: SystemTime::now(),
            attributes,
            status,
        });
    }

    /// Emits the saga's own span when it ended at `at` — if `sagad` made one
    /// for it (see [`join`]) and its trace is sampled.
    pub fn saga_end(&self, saga: &Saga, at: DateTime<Utc>) {
        let Some(trace) = &saga.trace else { return };
        let Some(own) = TraceParent::parse(&trace.traceparent).filter(TraceParent::sampled) else {
            return;
        };
        // Without a saga span of ours the traceparent is the caller's own
        // span, which is not ours to emit.
        if !trace.saga_span {
            return;
        }
        let parent = trace.caller_span.as_deref().and_then(span_id_from_hex);
        let status = if saga.state == crate::domain::SagaState::Completed {
            Status::Ok
        } else {
            Status::Unset
        };
        self.emit(Finished {
            name: format!("saga {}", saga.definition).into(),
            kind: SpanKind::Internal,
            own,
            parent,
            state: trace.tracestate.as_deref(),
            start: saga.created_at.into(),
            end: at.max(saga.created_at).into(),
            attributes: vec![
                KeyValue::new("saga.id", saga.id.to_string()),
                KeyValue::new("saga.definition", saga.definition.clone()),
                KeyValue::new("saga.version", i64::from(saga.version)),
                KeyValue::new("saga.state", saga.state.to_string()),
            ],
            status,
        });
    }

    fn emit(&self, f: Finished<'_>) {
        let state = f
            .state
            .and_then(|s| s.parse::<TraceState>().ok())
            .unwrap_or_default();
        let context = SpanContext::new(
            TraceId::from_bytes(f.own.trace_id),
            SpanId::from_bytes(f.own.span_id),
            TraceFlags::new(f.own.flags),
            false,
            state,
        );
        self.processor.on_end(SpanData {
            span_context: context,
            parent_span_id: f.parent.map_or(SpanId::INVALID, SpanId::from_bytes),
            parent_span_is_remote: f.parent.is_some(),
            span_kind: f.kind,
            name: f.name,
            start_time: f.start,
            end_time: f.end,
            attributes: f.attributes,
            dropped_attributes_count: 0,
            events: Default::default(),
            links: Default::default(),
            status: f.status,
            instrumentation_scope: self.scope.clone(),
        });
    }
}

/// A call's span between its start and its answer.
#[derive(Debug, Clone, Copy)]
pub struct AttemptSpan {
    /// Sent to the participant.
    pub own: TraceParent,
    parent: TraceParent,
    start: SystemTime,
}

/// What a call's span describes.
#[derive(Debug, Clone, Copy)]
pub struct CallSpan<'a> {
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
}

struct Finished<'a> {
    name: Cow<'static, str>,
    kind: SpanKind,
    own: TraceParent,
    parent: Option<[u8; 8]>,
    state: Option<&'a str>,
    start: SystemTime,
    end: SystemTime,
    attributes: Vec<KeyValue>,
    status: Status,
}

/// The trace a new saga joins: `caller` is the context its `StartSaga`
/// carried. With `exporting`, the saga gets a span of its own (in the
/// caller's trace, or at the root of a new one); without, the caller's
/// context is kept as it came, to pass on to the participants.
pub fn join(exporting: bool, caller: Option<(TraceParent, Option<String>)>) -> Option<SagaTrace> {
    match (exporting, caller) {
        (false, None) => None,
        (false, Some((tp, tracestate))) => Some(SagaTrace {
            traceparent: tp.to_string(),
            tracestate,
            caller_span: None,
            saga_span: false,
        }),
        (true, Some((tp, tracestate))) => Some(SagaTrace {
            traceparent: tp.child(span_id()).to_string(),
            tracestate,
            caller_span: Some(to_hex(&tp.span_id)),
            saga_span: true,
        }),
        (true, None) => Some(SagaTrace {
            traceparent: TraceParent {
                trace_id: nonzero(),
                span_id: span_id(),
                flags: FLAG_SAMPLED,
            }
            .to_string(),
            tracestate: None,
            caller_span: None,
            saga_span: true,
        }),
    }
}

fn error_status(e: &str) -> Status {
    let mut end = e.len().min(256);
    while !e.is_char_boundary(end) {
        end -= 1;
    }
    Status::error(e[..end].to_owned())
}

fn span_id() -> [u8; 8] {
    nonzero()
}

fn nonzero<const N: usize>() -> [u8; N] {
    loop {
        let id: [u8; N] = rand::random();
        if id != [0; N] {
            return id;
        }
    }
}
