//! Trace context between the SDK and `sagad` (W3C `traceparent` in the
//! call's metadata, read and written by `saga_proto::trace`).
//!
//! The client sends the caller's current OpenTelemetry context with
//! `StartSaga`; `sagad` keeps it with the saga and sends each call's context
//! to the participant, which runs the handler inside a span that is a child
//! of `sagad`'s span for that attempt. Spans go to the process's global
//! tracer provider (`opentelemetry::global::set_tracer_provider`): without
//! one they are not recorded, and the context still flows.

use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId, TraceState, Tracer,
};
use opentelemetry::{Context, KeyValue};
use tonic::metadata::MetadataMap;

use crate::proto::trace::TraceParent;

/// Puts the current OpenTelemetry context, if it has a valid span, on a
/// request.
pub(crate) fn inject_current(md: &mut MetadataMap) {
    let cx = Context::current();
    let span = cx.span();
    let sc = span.span_context();
    if !sc.is_valid() {
        return;
    }
    let tp = TraceParent {
        trace_id: sc.trace_id().to_bytes(),
        span_id: sc.span_id().to_bytes(),
        flags: sc.trace_flags().to_u8(),
    };
    let state = sc.trace_state().header();
    tp.to_metadata(md, Some(state.as_str()).filter(|s| !s.is_empty()));
}

/// The context a handler runs in: a server span named `name`, a child of
/// the caller's span when the request carries one.
pub(crate) fn handler_context(
    md: &MetadataMap,
    name: String,
    attributes: Vec<KeyValue>,
) -> Context {
    let parent = match TraceParent::from_metadata(md) {
        Some((tp, state)) => Context::new().with_remote_span_context(SpanContext::new(
            TraceId::from_bytes(tp.trace_id),
            SpanId::from_bytes(tp.span_id),
            TraceFlags::new(tp.flags),
            true,
            state
                .and_then(|s| s.parse::<TraceState>().ok())
                .unwrap_or_default(),
        )),
        None => Context::new(),
    };
    let tracer = opentelemetry::global::tracer("saga-sdk");
    let span = tracer
        .span_builder(name)
        .with_kind(SpanKind::Server)
        .with_attributes(attributes)
        .start_with_context(&tracer, &parent);
    parent.with_span(span)
}

/// Ends the handler's span with how the call went.
pub(crate) fn end(cx: &Context, outcome: &'static str, error: Option<&str>) {
    let span = cx.span();
    span.set_attribute(KeyValue::new("saga.outcome", outcome));
    match error {
        Some(e) => span.set_status(Status::error(e.to_owned())),
        None if outcome == "succeeded" => span.set_status(Status::Ok),
        None => {}
    }
    span.end();
}
