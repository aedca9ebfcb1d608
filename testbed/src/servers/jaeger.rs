//! Real Jaeger (v2, built from its Go module) on 127.0.0.1: OTLP/gRPC in,
//! traces kept in memory, Jaeger's HTTP query API out.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use crate::builds::fixtures::JAEGER;
use crate::support::process::{self, Lifetime, free_ports};
use crate::{Error, Result, io_err};

pub struct Jaeger {
    /// Where to send OTLP/gRPC: `http://127.0.0.1:<port>`, the value for
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub otlp_endpoint: String,
    /// The query service (API and UI): `127.0.0.1:<port>`.
    pub query: String,
    pub log: PathBuf,
    child: Child,
}

impl Jaeger {
    pub fn start(dir: &Path) -> Result<Self> {
        Self::start_with_ui(dir, None)
    }

    /// `ui_assets`: a directory the query service serves as its UI instead
    /// of the one compiled in.
    pub fn start_with_ui(dir: &Path, ui_assets: Option<&Path>) -> Result<Self> {
        let bin = JAEGER.require()?;
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let [otlp, query, query_grpc] = free_ports()?;
        let assets = ui_assets
            .map(|p| format!("    ui:\n      assets_path: {}\n", p.display()))
            .unwrap_or_default();
        // Only what the tests use: no host metrics port, no health, sampling
        // or zpages listeners, nothing bound beyond loopback.
        let yaml = format!(
            "service:
  extensions: [jaeger_storage, jaeger_query]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [jaeger_storage_exporter]
  telemetry:
    metrics:
      level: none
    logs:
      level: info
extensions:
  jaeger_storage:
    backends:
      memory_store:
        memory:
          max_traces: 100000
  jaeger_query:
    storage:
      traces: memory_store
    http:
      endpoint: 127.0.0.1:{query}
    grpc:
      endpoint: 127.0.0.1:{query_grpc}
{assets}receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 127.0.0.1:{otlp}
processors:
  batch:
    timeout: 200ms
exporters:
  jaeger_storage_exporter:
    trace_storage: memory_store
"
        );
        let config = dir.join("jaeger.yaml");
        std::fs::write(&config, yaml).map_err(io_err(&config))?;
        let log = dir.join("jaeger.log");
        let mut cmd = Command::new(bin);
        cmd.arg("--config").arg(&config);
        let child = process::spawn(cmd, &log, Lifetime::Owned)?;
        let mut jaeger = Jaeger {
            otlp_endpoint: format!("http://127.0.0.1:{otlp}"),
            query: format!("127.0.0.1:{query}"),
            log,
            child,
        };
        jaeger.wait_ready(Duration::from_secs(60))?;
        Ok(jaeger)
    }

    fn wait_ready(&mut self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(Error::Exited {
                    what: "jaeger",
                    status: status.to_string(),
                    log: self.log.display().to_string(),
                });
            }
            let otlp_open =
                std::net::TcpStream::connect(self.otlp_endpoint.trim_start_matches("http://"))
                    .is_ok();
            if otlp_open && matches!(self.get("/api/services"), Ok((200, _))) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Error::NotReady {
                    what: "jaeger",
                    secs: limit.as_secs(),
                    log: self.log.display().to_string(),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The environment that makes an OpenTelemetry SDK (ours, or
    /// containerd's) export here over OTLP/gRPC, in batches sent within a
    /// fraction of a second instead of the default five.
    pub fn exporter_env(&self) -> [(&'static str, String); 4] {
        [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", self.otlp_endpoint.clone()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc".into()),
            ("OTEL_EXPORTER_OTLP_INSECURE", "true".into()),
            ("OTEL_BSP_SCHEDULE_DELAY", "200".into()),
        ]
    }

    /// A GET on the query service: status code and body.
    pub fn get(&self, path: &str) -> std::io::Result<(u16, String)> {
        process::http_get(&self.query, path)
    }

    /// Traces of `service` (Jaeger's JSON: `data[]` of `{traceID, spans, processes}`).
    pub fn traces(&self, service: &str, limit: usize) -> std::io::Result<serde_json::Value> {
        self.json(&format!("/api/traces?service={service}&limit={limit}"))
    }

    /// One trace by id, same shape as [`Jaeger::traces`].
    pub fn trace(&self, trace_id: &str) -> std::io::Result<serde_json::Value> {
        self.json(&format!("/api/traces/{trace_id}"))
    }

    fn json(&self, path: &str) -> std::io::Result<serde_json::Value> {
        let (code, body) = self.get(path)?;
        if code != 200 {
            return Err(std::io::Error::other(format!(
                "GET {path} answered {code}: {body}"
            )));
        }
        serde_json::from_str(&body).map_err(std::io::Error::other)
    }
}

impl Drop for Jaeger {
    fn drop(&mut self) {
        process::stop(&mut self.child);
    }
}
