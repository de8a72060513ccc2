#!/usr/bin/env bash
# Install the farm and what its tests need, on a fresh machine or an existing one (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# torch first, pinned, so pip takes the local CPU wheel instead of pulling CUDA packages for it.
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.__version__.startswith("2.13.0") else 1)' 2>/dev/null; then
    "$PY" -m pip install --quiet torch==2.13.0
fi
"$PY" -m pip install --quiet -e '.[test]'
# OR-Tools' CP-SAT: the scheduler benchmark's exact reference and its test (never a runtime dependency).
# Its wheel pins protobuf<6.34, which would pull protobuf below the 7.x that Ray Serve's gRPC reflection
# was generated for (Serve then fails to start); CP-SAT runs fine on 7.x, so it goes in without its pins.
"$PY" -m pip install --quiet --no-deps ortools==9.15.6755
"$PY" -m pip install --quiet absl-py immutabledict pandas
# Debian's packages: Prometheus for the dashboard test (it starts it itself), Chromium for the tests that
# open the farm's pages (the QC report) in a real headless browser, strace for the test that traces a
# local farm's connect() calls.
if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1 \
        || ! command -v chromium >/dev/null 2>&1 || ! command -v strace >/dev/null 2>&1; then
    SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
    $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus chromium \
        chromium-driver strace >/dev/null
fi
