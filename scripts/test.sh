#!/usr/bin/env bash
# The whole test suite, from a fresh clone: checks formatting and lints, then
# runs unit, property, simulation, loopback and real-process tests.
# Everything the tests need is installed here: the Rust toolchain is required;
# OpenSSH's sshd (for the SFTP tests, which start their own on loopback) is
# installed when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v sshd >/dev/null && [ ! -x /usr/sbin/sshd ]; then
  echo "== installing openssh-server (SFTP tests start their own sshd)"
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server
fi

if ! command -v rclone >/dev/null; then
  echo "== installing rclone (SFTP tests against rclone serve sftp, a server that is not OpenSSH)"
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rclone
fi

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
