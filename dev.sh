#!/usr/bin/env bash
# Mailers developer entry point. On a fresh Debian machine:
#   bash dev.sh demo   install everything, start a local cluster, send a 1,000-recipient campaign
#   bash dev.sh test   install everything, run lint, type checks and the whole test suite
# Other commands: cluster (run the local cluster until Ctrl-C), check (lint + types + unit
# tests), gen-protos (regenerate mailerpb/), bench, lock (upgrade every dependency in
# uv.lock), api-baseline (record the released API for buf breaking).
set -euo pipefail
cd "$(dirname "$0")"

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
PY=.venv/bin/python

install_system() {
  local want=()
  command -v etcd >/dev/null || want+=(etcd-server etcd-client)
  [ -x /usr/lib/postgresql/15/bin/initdb ] || want+=(postgresql)
  command -v python3 >/dev/null || want+=(python3)
  python3 -c 'import venv, ensurepip' 2>/dev/null || want+=(python3-venv)
  command -v npm >/dev/null || want+=(nodejs npm)
  command -v gcc >/dev/null || want+=(gcc python3-dev)
  command -v iptables >/dev/null || want+=(iptables)
  command -v ip >/dev/null || want+=(iproute2)
  # The console's browser tests (tests/browser) drive Debian's chromium through its driver.
  { [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; } || want+=(chromium chromium-driver)
  if [ ${#want[@]} -gt 0 ]; then
    echo "== apt-get install ${want[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${want[@]}" >/dev/null
  fi
}

UV=.tools/uv/bin/uv
export UV_PYTHON_DOWNLOADS=never

install_uv() {
  # uv itself comes pinned with hashes; everything else comes from uv.lock through it.
  if ! "$UV" --version 2>/dev/null | grep -q "^uv $(sed -n 's/^uv==\([^ ]*\).*/\1/p' tools/uv-requirements.txt)\b"; then
    echo "== install uv (tools/uv-requirements.txt)"
    rm -rf .tools/uv
    python3 -m venv .tools/uv
    .tools/uv/bin/pip install -q --disable-pip-version-check --require-hashes \
      -r tools/uv-requirements.txt
  fi
}

install_python() {
  install_uv
  # --locked: refuse to run when pyproject.toml and uv.lock disagree (re-lock with
  # `bash dev.sh lock`), so every machine installs exactly the versions in the lock.
  # Bytecode compiled here, once: where it is not written at import (PYTHONDONTWRITEBYTECODE,
  # a read-only venv), every node, coordinator and `mailers` command compiled its imports
  # again at start (a coordinator's imports: 1.8-2.0 s of CPU instead of 0.9).
  "$UV" sync --locked --all-packages --python python3 --quiet --compile-bytecode
  "$PY" -m compileall -q coordinator sender_node mailers_runtime mailerpb client_sdk mailers \
    mailers_dev bench tests >/dev/null
}

install_buf() {
  if [ ! -x tools/node_modules/.bin/buf ] || [ tools/package-lock.json -nt tools/node_modules/.package-lock.json ]; then
    echo "== npm ci (tools/package-lock.json: buf)"
    (cd tools && npm ci --silent --no-audit --no-fund >/dev/null 2>&1)
  fi
}

lint() {
  echo "== ruff"; .venv/bin/ruff check . && .venv/bin/ruff format --check .
  echo "== mypy --strict"; .venv/bin/mypy coordinator sender_node mailers_runtime client_sdk mailers mailers_dev tests bench
  echo "== buf lint"; tools/node_modules/.bin/buf lint
  # The API as released is kept in tools/api-baseline.binpb (`bash dev.sh api-baseline`
  # refreshes it on a release); a change that breaks it fails here.
  echo "== buf breaking"; tools/node_modules/.bin/buf breaking --against tools/api-baseline.binpb
  echo "== generated code is current"; "$PY" scripts/gen_protos.py --check
}

case "${1:-}" in
  demo)
    install_system; install_python
    exec .venv/bin/mailers demo "${@:2}"
    ;;
  cluster)
    install_system; install_python
    exec .venv/bin/mailers cluster "${@:2}"
    ;;
  test)
    install_system; install_python; install_buf
    lint
    echo "== pytest"
    # Two workers: most chaos tests wait on faults that last seconds, so a second stream
    # of tests fills the idle core (tests/conftest.py says what runs together). A third
    # was tried: the fault tests then ran 50-100% longer and hit their deadlines.
    exec .venv/bin/pytest -n 2 --dist loadgroup --durations=40 "${@:2}"
    ;;
  check)
    install_system; install_python; install_buf
    lint
    exec .venv/bin/pytest tests/unit -q
    ;;
  gen-protos)
    install_python
    exec "$PY" scripts/gen_protos.py
    ;;
  lock)
    # The one command that moves dependencies: re-resolve every package to the newest
    # release pyproject.toml allows, then install from the new lock.
    install_uv
    "$UV" lock --upgrade --python python3
    install_python
    ;;
  api-baseline)
    install_buf
    exec tools/node_modules/.bin/buf build -o tools/api-baseline.binpb
    ;;
  bench)
    install_system; install_python
    if [ ! -x /usr/sbin/smtp-sink ] || [ ! -x /usr/sbin/smtp-source ]; then
      echo "== apt-get install postfix (smtp-sink, smtp-source for the benchmark)"
      $SUDO apt-get update -qq
      DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postfix >/dev/null
    fi
    exec "$PY" -m bench.e2e "${@:2}"
    ;;
  *)
    sed -n '2,8p' "$0"
    exit 2
    ;;
esac
