#!/usr/bin/env bash
# The project's one test command: installs what the tests need, then format check, clippy and
# the whole test suite. Used by developers and by CI (.ci/run).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() {
    printf '\n==> %s\n' "$*"
}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        echo "need root for: $* (and sudo is not installed)" >&2
        return 1
    fi
}

step "system packages: zookeeper, java, iproute2, tzdata, rsync, qemu-utils, xfsprogs, python3"
if [ ! -f /usr/share/java/zookeeper.jar ] || ! command -v java >/dev/null 2>&1 || ! command -v ip >/dev/null 2>&1 \
    || [ ! -d /usr/share/zoneinfo ] || ! command -v rsync >/dev/null 2>&1 || ! command -v qemu-img >/dev/null 2>&1 \
    || ! command -v mkfs.xfs >/dev/null 2>&1 || ! command -v python3 >/dev/null 2>&1; then
    as_root apt-get update
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        zookeeper iproute2 tzdata rsync qemu-utils xfsprogs python3
else
    echo "already installed"
fi

step "rust components: rustfmt, clippy"
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
    rustup component add rustfmt clippy
else
    echo "already installed"
fi

step "cargo fmt --all -- --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings

step "cargo doc --no-deps (warnings are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps

# The integration tests start the examples (task_server, taskctl) as processes; the test harness
# builds them on first use too, but building them here keeps that out of the tests' deadlines.
step "cargo build --examples"
cargo build --examples

step "cargo test --no-fail-fast --lib --bins --tests -- --test-threads=4"
cargo test --no-fail-fast --lib --bins --tests -- --test-threads=4

# Benches run once each, in test mode (criterion's, and the peers comparison as a smoke run on
# small volumes); their harnesses take no libtest flags.
step "cargo test --benches"
cargo test --benches

step "cargo test --doc"
cargo test --doc
