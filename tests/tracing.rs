//! Traces end to end: a caller's context on `StartSaga` → the saga's span →
//! one span per call → the SDK participant's span, all exported over OTLP to
//! a collector that runs inside the test (a tonic server for the collector's
//! trace service).
#![allow(clippy::unwrap_used)]

#[path = "common/bin.rs"]
mod bin;
#[path = "common/certs.rs"]
mod certs;
mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry::trace::{FutureExt, TraceContextExt, Tracer, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider};
use saga_sdk::{Client, Participant, RegisterOptions, RetryPolicy, SagaDefinition, SagaState};
use tokio::sync::Notify;

use common::{test_config, TestCoordinator, TestDb};

/// A span as the collector received it, with the service that sent it.
#[derive(Debug, Clone)]
struct Got {
    service: String,
    name: String,
    trace: String,
    span: String,
    parent: String,
    attrs: HashMap<String, String>,
}

#[derive(Default)]
struct Collector {
    spans: Mutex<Vec<Got>>,
    arrived: Notify,
}

/// The collector's gRPC face.
struct Sink(Arc<Collector>);

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = Vec::new();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .map(|r| attrs(&r.attributes))
                .and_then(|a| a.get("service.name").cloned())
                .unwrap_or_default();
            for s in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                got.push(Got {
                    service: service.clone(),
                    name: s.name,
                    trace: hex(&s.trace_id),
                    span: hex(&s.span_id),
                    parent: hex(&s.parent_span_id),
                    attrs: attrs(&s.attributes),
                });
            }
        }
        self.0.spans.lock().unwrap().extend(got);
        self.0.arrived.notify_waiters();
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Collector {
    /// Starts one on 127.0.0.1; its URL.
    async fn start() -> (Arc<Collector>, String) {
        let this = Arc::new(Collector::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let svc = TraceServiceServer::new(Sink(this.clone()));
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
        });
        (this, format!("http://{addr}"))
    }

    /// Waits (up to 30 s) until `done` holds of the spans received.
    async fn until(&self, what: &str, done: impl Fn(&[Got]) -> bool) -> Vec<Got> {
        let wait = async {
            loop {
                let arrived = self.arrived.notified();
                {
                    let spans = self.spans.lock().unwrap();
                    if done(&spans) {
                        return spans.clone();
                    }
                }
                arrived.await;
            }
        };
        match tokio::time::timeout(Duration::from_secs(30), wait).await {
            Ok(spans) => spans,
            Err(_) => panic!(
                "collector never saw {what}; it has: {:#?}",
                self.spans.lock().unwrap()
            ),
        }
    }
}

fn attrs(kvs: &[KeyValue]) -> HashMap<String, String> {
    kvs.iter()
        .map(|kv| {
            let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(Value::StringValue(s)) => s.clone(),
                Some(Value::IntValue(i)) => i.to_string(),
                Some(Value::BoolValue(b)) => b.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), v)
        })
        .collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// This process's spans (the caller and the SDK participants) go to the
/// collector as service `participants`.
fn install_global_tracer(collector: &str) -> SdkTracerProvider {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(collector)
        .build()
        .unwrap();
    let batch = BatchConfigBuilder::default()
        .with_scheduled_delay(Duration::from_millis(50))
        .build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(
            BatchSpanProcessor::builder(exporter)
                .with_batch_config(batch)
                .build(),
        )
        .with_resource(
            opentelemetry_sdk::Resource::builder_empty()
                .with_service_name("participants")
                .build(),
        )
        .build();
    opentelemetry::global::set_tracer_provider(provider.clone());
    provider
}

fn participants() -> (Participant, Participant) {
    let inventory = Participant::builder("inventory")
        .action("reserve", |_ctx, _: serde_json::Value| async move {
            // The handler runs inside the participant's span.
            let cx = opentelemetry::Context::current();
            assert!(cx.span().span_context().is_valid());
            Ok("A1")
        })
        .compensation(
            "release",
            |_ctx, _: serde_json::Value, _: Option<String>| async move { Ok(()) },
        )
        .build();
    let payments = Participant::builder("payments")
        .action("charge", |ctx, _: serde_json::Value| async move {
            if ctx.attempt == 1 {
                return Err(saga_sdk::StepError::unknown("gateway timed out"));
            }
            Ok("paid")
        })
        .build();
    (inventory, payments)
}

async fn serve(client: &Client, p: &Participant) -> saga_sdk::Registration {
    let (addr, _) = saga_sdk::serve_local(p.clone(), std::future::pending())
        .await
        .unwrap();
    p.register(
        [client.clone()],
        format!("http://{addr}"),
        RegisterOptions::default(),
    )
    .await
    .unwrap()
}

/// Starts a saga of `definition` with `traceparent` (and `tracestate`) in
/// the request's metadata, as a caller outside the SDK would.
async fn start_traced(
    c: &mut common::Client,
    definition: &str,
    traceparent: &str,
    tracestate: Option<&str>,
) -> saga_coordinator::proto::Saga {
    let mut request = tonic::Request::new(saga_coordinator::proto::StartSagaRequest {
        definition: definition.into(),
        input_json: "{}".into(),
        ..Default::default()
    });
    let md = request.metadata_mut();
    md.insert("traceparent", traceparent.parse().unwrap());
    if let Some(state) = tracestate {
        md.insert("tracestate", state.parse().unwrap());
    }
    c.start_saga(request)
        .await
        .unwrap()
        .into_inner()
        .saga
        .unwrap()
}

fn by<'a>(spans: &'a [Got], service: &str, name: &str) -> Vec<&'a Got> {
    spans
        .iter()
        .filter(|s| s.service == service && s.name == name)
        .collect()
}

#[tokio::test]
async fn one_trace_from_the_caller_through_sagad_to_the_participants() {
    let (collector, url) = Collector::start().await;
    let provider = install_global_tracer(&url);
    let db = TestDb::new().await;
    let mut cfg = test_config(&db);
    cfg.otlp_endpoint = Some(url.clone());
    let coord = TestCoordinator::start(cfg).await;
    let client = Client::connect(format!("http://{}", coord.addr))
        .await
        .unwrap();
    let (inventory, payments) = participants();
    let _inv = serve(&client, &inventory).await;
    let _pay = serve(&client, &payments).await;
    let fast = RetryPolicy::exponential(3, Duration::from_millis(10), Duration::from_millis(20));
    let def = SagaDefinition::builder("order")
        .step(
            saga_sdk::Step::new("reserve", "inventory")
                .compensation("release")
                .idempotent()
                .retry(fast),
        )
        .step(
            saga_sdk::Step::new("charge", "payments")
                .idempotent()
                .retry(fast),
        )
        .build()
        .unwrap();
    client.register(&def).await.unwrap();

    // The caller's span, current while it starts the saga.
    let tracer = provider.tracer("checkout-service");
    let caller = tracer.start("checkout");
    let caller_cx = opentelemetry::Context::current_with_span(caller);
    let saga = client
        .start("order", &serde_json::json!({"order": 7}))
        .with_context(caller_cx.clone())
        .await
        .unwrap();
    let saga = client.wait(saga.id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(saga.state, SagaState::Completed);
    caller_cx.span().end();
    // Shutting down flushes sagad's spans.
    coord.shutdown().await;

    let spans = collector
        .until("the caller's, sagad's and the participants' spans", |s| {
            by(s, "participants", "checkout").len() == 1
                && by(s, "sagad", "saga order").len() == 1
                && by(s, "participants", "action charge").len() == 2
        })
        .await;
    let root = by(&spans, "participants", "checkout")[0];
    assert_eq!(root.parent, "", "the caller's span is the root");
    // One trace.
    assert!(
        spans.iter().all(|s| s.trace == root.trace),
        "spans in several traces: {spans:#?}"
    );
    // The saga's span is the caller's child.
    let saga_span = by(&spans, "sagad", "saga order")[0];
    assert_eq!(saga_span.parent, root.span);
    assert_eq!(saga_span.attrs["saga.id"], saga.id.to_string());
    assert_eq!(saga_span.attrs["saga.state"], "COMPLETED");
    // One span per attempt, children of the saga's span; the retry shows
    // as two attempts.
    let reserve = by(&spans, "sagad", "action reserve");
    let mut charge = by(&spans, "sagad", "action charge");
    charge.sort_by_key(|s| s.attrs["saga.attempt"].clone());
    assert_eq!(reserve.len(), 1);
    assert_eq!(charge.len(), 2);
    for s in reserve.iter().chain(&charge) {
        assert_eq!(s.parent, saga_span.span, "{s:?}");
        assert_eq!(s.attrs["saga.id"], saga.id.to_string());
    }
    assert_eq!(reserve[0].attrs["saga.participant"], "inventory");
    assert_eq!(
        (
            charge[0].attrs["saga.attempt"].as_str(),
            charge[0].attrs["saga.outcome"].as_str()
        ),
        ("1", "unknown")
    );
    assert_eq!(
        (
            charge[1].attrs["saga.attempt"].as_str(),
            charge[1].attrs["saga.outcome"].as_str()
        ),
        ("2", "succeeded")
    );
    // Each participant span is the child of sagad's span for that attempt.
    let handled = by(&spans, "participants", "action reserve");
    assert_eq!(handled.len(), 1);
    assert_eq!(handled[0].parent, reserve[0].span);
    let mut handled = by(&spans, "participants", "action charge");
    handled.sort_by_key(|s| s.attrs["saga.attempt"].clone());
    for (p, s) in handled.iter().zip(&charge) {
        assert_eq!(p.parent, s.span, "participant span {p:?} under {s:?}");
        assert_eq!(p.attrs["saga.attempt"], s.attrs["saga.attempt"]);
    }
    let _ = tokio::task::spawn_blocking(move || provider.shutdown()).await;
}

/// `sagad` as shipped, exporting because of the standard variable alone: a
/// saga started without a context gets a trace of its own (its span the
/// root), each call carries its attempt span's context, and the JSON log
/// lines of the saga carry the trace id.
#[tokio::test]
async fn the_binary_exports_by_the_standard_variables_and_logs_the_trace_id() {
    let (collector, url) = Collector::start().await;
    let db = TestDb::new().await;
    let svc = common::Scripted::default();
    let svc_url = svc.clone().serve().await;
    let (mut child, _, started, rest) = bin::spawn_cmd_started(
        bin::sagad()
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", &url)
            .env("OTEL_SERVICE_NAME", "sagad-under-test")
            .env("OTEL_BSP_SCHEDULE_DELAY", "50")
            .args([
                "--database-url",
                &db.url,
                "--grpc-addr",
                "127.0.0.1:0",
                "--admin-addr",
                "127.0.0.1:0",
                "--log-format",
                "json",
                "--participant",
                &format!("svc={svc_url}"),
            ]),
    );
    let started: serde_json::Value = serde_json::from_str(&started).unwrap();
    let grpc = started["grpc_addr"].as_str().unwrap().to_owned();
    let mut c = common::client_at(&grpc, None).await;
    common::register(
        &mut c,
        common::definition("abc", vec![common::step("a", "svc", true, true)]),
    )
    .await;
    let saga = common::start(&mut c, "abc", "{}").await;
    common::wait(&mut c, &saga.saga_id).await;
    let spans = collector
        .until("the saga's span", |s| {
            !by(s, "sagad-under-test", "saga abc").is_empty()
                && !by(s, "sagad-under-test", "action a").is_empty()
        })
        .await;
    let root = by(&spans, "sagad-under-test", "saga abc")[0];
    assert_eq!(
        root.parent, "",
        "no caller context: the saga's span is the root"
    );
    let call = by(&spans, "sagad-under-test", "action a")[0];
    assert_eq!(
        (call.parent.as_str(), call.trace.as_str()),
        (root.span.as_str(), root.trace.as_str())
    );
    let sent = svc.calls_to("a.do")[0].traceparent.clone();
    assert_eq!(sent, Some(format!("00-{}-{}-01", call.trace, call.span)));

    let trace = root.trace.clone();
    let lines = tokio::task::spawn_blocking(move || {
        let mut seen = Vec::new();
        while let Ok(l) = rest.recv_timeout(Duration::from_secs(20)) {
            let done = l.contains("\"completed\"");
            seen.push(l);
            if done {
                break;
            }
        }
        seen
    })
    .await
    .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let settled: serde_json::Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    assert_eq!(settled["span"]["saga_id"], saga.saga_id, "{settled}");
    assert_eq!(settled["span"]["trace_id"], trace, "{settled}");
}

/// Without an exporter nothing is recorded, but a caller's context still
/// reaches the participants unchanged (their spans join the caller's trace).
#[tokio::test]
async fn without_an_exporter_the_callers_context_is_passed_on() {
    let db = TestDb::new().await;
    let (svc, cfg) = common::with_svc(&db).await;
    let coord = TestCoordinator::start(cfg).await;
    let mut c = coord.client().await;
    common::register(
        &mut c,
        common::definition("abc", vec![common::step("a", "svc", true, true)]),
    )
    .await;
    let caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let saga = start_traced(&mut c, "abc", caller, Some("vendor=1")).await;
    common::wait(&mut c, &saga.saga_id).await;
    assert_eq!(svc.calls_to("a.do")[0].traceparent.as_deref(), Some(caller));
    // A header that is not a traceparent is ignored, not an error.
    let saga = start_traced(&mut c, "abc", "00-not-a-trace-01", None).await;
    common::wait(&mut c, &saga.saga_id).await;
    assert_eq!(svc.calls_to("a.do")[1].traceparent, None);
    coord.shutdown().await;
}

/// The context is kept with the saga: after the coordinator that started it
/// crashes mid-call, the one that takes over makes its calls in the same
/// trace, under the same saga span, and emits that span when the saga ends.
#[tokio::test]
async fn a_takeover_continues_the_same_trace() {
    let (collector, url) = Collector::start().await;
    let db = TestDb::new().await;
    let (svc, mut cfg) = common::with_svc(&db).await;
    cfg.otlp_endpoint = Some(url);
    cfg.lease_ttl_ms = 1_000;
    let first = TestCoordinator::start(cfg.clone()).await;
    let mut c = first.client().await;
    common::register(
        &mut c,
        common::definition(
            "ab",
            vec![
                common::step("a", "svc", true, true),
                common::step("b", "svc", true, true),
            ],
        ),
    )
    .await;
    let (gate, gate_rx) = tokio::sync::watch::channel(false);
    svc.script(
        "b.do",
        vec![
            common::Reply::Block(gate_rx.clone(), "{}".into()),
            common::Reply::Block(gate_rx, "{}".into()),
        ],
    );
    let caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let saga = start_traced(&mut c, "ab", caller, None).await;
    svc.wait_calls("b.do", 1).await;
    first.crash().await;
    let second = TestCoordinator::start(cfg).await;
    let mut c2 = second.client().await;
    svc.wait_calls("b.do", 2).await;
    gate.send(true).unwrap();
    common::wait(&mut c2, &saga.saga_id).await;
    second.shutdown().await;

    let spans = collector
        .until("the saga's span from the second coordinator", |s| {
            !by(s, "sagad", "saga ab").is_empty()
        })
        .await;
    let saga_span = by(&spans, "sagad", "saga ab")[0];
    assert_eq!(saga_span.trace, "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(saga_span.parent, "00f067aa0ba902b7", "the caller's span");
    // Both coordinators' calls of b: same trace, children of the saga span.
    let calls = svc.calls_to("b.do");
    assert_eq!(calls.len(), 2);
    for call in calls {
        let tp = call.traceparent.unwrap();
        assert!(
            tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{tp}"
        );
    }
    for s in by(&spans, "sagad", "action b") {
        assert_eq!(s.parent, saga_span.span, "{s:?}");
    }
    assert!(
        !by(&spans, "sagad", "action b").is_empty(),
        "the second coordinator's call of b is exported: {spans:#?}"
    );
}
