//! End-to-end tests live in `tests/`: the Helm chart and the OLM bundle with
//! their real tools, the images run in containerd, the binaries together as
//! processes (one trace through them, read back from Jaeger), and kubectl as
//! an administrator types it.
