#!/usr/bin/env bash
# The whole test suite, from a fresh clone: checks formatting and lints, then
# runs unit, property, simulation, loopback and real-process tests.
# Everything the tests need is installed here (today: only the Rust toolchain).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null; then
  echo "scripts/test.sh: cargo is required (https://rustup.rs)" >&2
  exit 1
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo test"
cargo test --workspace
