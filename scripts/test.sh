#!/usr/bin/env bash
# Runs every test of the workspace: build the binaries the process-level
# tests start, then the unit, property and integration tests.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --bins
cargo test --workspace
