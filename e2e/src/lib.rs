//! End-to-end tests live in `tests/`: the Helm chart, linted and installed
//! with real helm into the real test-bed API server.
