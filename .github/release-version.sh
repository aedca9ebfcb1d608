#!/usr/bin/env bash
# The version a release publishes, from its git tag: v0.1.0 -> 0.1.0, the
# form the chart (appVersion) and the CSV pull. Fails when the tag does not
# match the workspace version. Writes `version=...` to $GITHUB_OUTPUT.
# Run by the release workflow, and by e2e/tests/chart.rs.
set -euo pipefail
version="${GITHUB_REF_NAME#v}"
workspace=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
if [ "$version" != "$workspace" ]; then
  echo "tag $GITHUB_REF_NAME does not match the workspace version $workspace" >&2
  exit 1
fi
echo "version=$version" >> "$GITHUB_OUTPUT"
