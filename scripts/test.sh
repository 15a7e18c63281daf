#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what is missing, checks formatting and lints,
# then runs every test (unit tests, and the integration suite against a real PostgreSQL 15).
# Usage: scripts/test.sh            (from anywhere inside the repository)
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh

# Debug builds keep compile time down on small machines; the hot codec crates are optimised
# even in debug (see [profile.dev.package] in Cargo.toml).
cargo fmt --all --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo test --workspace --no-fail-fast
