//! Process plumbing shared by the controller and the agent: logging,
//! tracing and its propagation across processes (`propagation`), the
//! shutdown signal, and the operational HTTP endpoints `/metrics`,
//! `/healthz` and `/readyz` (`serve`).
//!
//! Logs go to stderr (`RUST_LOG` filters, `LOG_FORMAT=json` for JSON lines).
//! Traces go over OTLP/gRPC when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, and
//! nowhere otherwise: no exporter, no connection attempts, no cost.

pub mod propagation;
pub mod serve;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer as _};

/// Keeps the trace pipeline alive; flushes pending spans when dropped.
pub struct Guard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown();
        }
    }
}

/// Installs the global subscriber. `service` is the default `service.name`
/// (`OTEL_SERVICE_NAME` overrides it).
pub fn init(service: &str) -> Guard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("LOG_FORMAT").is_ok_and(|f| f == "json");

    let provider = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")
        .ok()
        .filter(|e| !e.is_empty())
        .and_then(|endpoint| match otlp_provider(service, &endpoint) {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("tracing export disabled: cannot set up OTLP to {endpoint}: {e}");
                None
            }
        });
    // kube-runtime wraps each reconcile in a span of its own; exported, it
    // would be the root of every reconcile's trace and stand alone whenever
    // a reconcile joins the trace of its rollout (controller::trace). Logs
    // keep it; traces start at our own spans.
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer(service.to_string()))
            .with_filter(tracing_subscriber::filter::filter_fn(|meta| {
                !(meta.is_span() && meta.target().starts_with("kube_runtime"))
            }))
    });

    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = if json {
        fmt.json().boxed()
    } else {
        fmt.boxed()
    };
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(otel)
        .with(fmt)
        .try_init();
    Guard { provider }
}

fn otlp_provider(
    service: &str,
    endpoint: &str,
) -> Result<SdkTracerProvider, opentelemetry_otlp::ExporterBuildError> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()?;
    let name = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| service.to_string());
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name(name).build())
        .build())
}

/// Completes on SIGTERM (how Kubernetes stops a pod) or SIGINT (a terminal).
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {},
                _ = term.recv() => {},
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
