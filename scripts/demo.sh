#!/usr/bin/env bash
# The main job: install, then render the example storyboard offline with tiny models into ./out.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
farm render examples/storyboard.yaml --models tiny --preview -o out "$@"
