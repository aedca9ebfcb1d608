//! Carrying a trace from one process to the next in W3C Trace Context form:
//! the controller writes the `traceparent` of the span that wrote a
//! NodeImageSet onto it, the agent continues that trace, and the agent puts
//! its own span's context into the gRPC metadata of each containerd call.
//!
//! Without an exporter (no `OTEL_EXPORTER_OTLP_ENDPOINT`) spans carry no
//! OpenTelemetry context; every function here then answers "nothing" and
//! nothing is written anywhere.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::{SpanContext, TraceContextExt as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The header (and annotation suffix) W3C Trace Context uses.
pub const TRACEPARENT: &str = "traceparent";

/// The trace context of `span` as headers (`traceparent`, and `tracestate`
/// when there is one); empty when the span is not being traced.
pub fn headers(span: &tracing::Span) -> HashMap<String, String> {
    let mut carrier = HashMap::new();
    let cx = span.context();
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    }
    carrier
}

/// The `traceparent` of `span`, when it is being traced.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    headers(span).remove(TRACEPARENT)
}

/// The span context `traceparent` names, if it is well-formed.
pub fn parse(traceparent: &str) -> Option<SpanContext> {
    let carrier = HashMap::from([(TRACEPARENT.to_string(), traceparent.to_string())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    let sc = cx.span().span_context().clone();
    sc.is_valid().then_some(sc)
}

/// The context of `span` itself, when it is being traced.
pub fn span_context(span: &tracing::Span) -> Option<SpanContext> {
    let sc = span.context().span().span_context().clone();
    sc.is_valid().then_some(sc)
}

/// Makes `parent` the parent of `span`. Must come before `span` is first
/// entered or asked for its context; later it has no effect. Returns whether
/// the parent was taken.
pub fn set_parent(span: &tracing::Span, parent: &SpanContext) -> bool {
    let cx = opentelemetry::Context::new().with_remote_span_context(parent.clone());
    span.set_parent(cx).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_reads_back_as_its_span_context() {
        let header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let sc = parse(header).expect("valid");
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
        assert!(sc.is_sampled());
    }

    #[test]
    fn malformed_traceparents_are_ignored() {
        for bad in [
            "",
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        ] {
            assert!(parse(bad).is_none(), "{bad:?} accepted");
        }
    }

    #[test]
    fn a_span_continues_the_trace_its_parent_names() {
        use opentelemetry::trace::TracerProvider as _;
        use tracing_subscriber::layer::SubscriberExt as _;
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("test"));
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            let parent =
                parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").expect("valid");
            let span = tracing::info_span!("child");
            assert!(set_parent(&span, &parent));
            let header = traceparent(&span).expect("traced");
            assert!(
                header.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
                "same trace: {header}"
            );
            assert!(
                !header.contains("00f067aa0ba902b7"),
                "its own span id: {header}"
            );
            // Once started, a span keeps its parent.
            assert!(!set_parent(&span, &parent));
            let inner = span.in_scope(|| traceparent(&tracing::Span::current()));
            assert_eq!(inner.as_deref(), Some(header.as_str()));
        });
    }

    #[test]
    fn untraced_spans_give_no_headers() {
        // No subscriber with an OpenTelemetry layer is installed in this test.
        let span = tracing::info_span!("untraced");
        assert!(headers(&span).is_empty());
        assert!(traceparent(&span).is_none());
        assert!(span_context(&span).is_none());
    }
}
