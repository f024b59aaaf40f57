#!/usr/bin/env bash
# Mailers developer entry point. On a fresh Debian machine:
#   bash dev.sh demo   install everything, start a local cluster, send a 1,000-recipient campaign
#   bash dev.sh test   install everything, run lint, type checks and the whole test suite
# Other commands: cluster (run the local cluster until Ctrl-C), check (lint + types + unit
# tests), gen-protos (regenerate mailerpb/), bench.
set -euo pipefail
cd "$(dirname "$0")"

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
PY=.venv/bin/python

install_system() {
  local want=()
  command -v etcd >/dev/null || want+=(etcd-server etcd-client)
  command -v python3 >/dev/null || want+=(python3)
  python3 -c 'import venv, ensurepip' 2>/dev/null || want+=(python3-venv)
  command -v npm >/dev/null || want+=(nodejs npm)
  command -v gcc >/dev/null || want+=(gcc python3-dev)
  command -v iptables >/dev/null || want+=(iptables)
  command -v ip >/dev/null || want+=(iproute2)
  if [ ${#want[@]} -gt 0 ]; then
    echo "== apt-get install ${want[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${want[@]}" >/dev/null
  fi
}

install_python() {
  if [ ! -x "$PY" ]; then python3 -m venv .venv; fi
  # Re-install only when pyproject.toml changed since the last install.
  if [ ! -f .venv/.installed ] || [ pyproject.toml -nt .venv/.installed ]; then
    echo "== pip install -e .[dev]"
    "$PY" -m pip install -q --disable-pip-version-check -e '.[dev]'
    touch .venv/.installed
  fi
}

install_buf() {
  if [ ! -x .tools/node_modules/.bin/buf ]; then
    echo "== npm install @bufbuild/buf"
    mkdir -p .tools
    (cd .tools && npm install --silent --no-audit --no-fund @bufbuild/buf@1 >/dev/null)
  fi
}

lint() {
  echo "== ruff"; .venv/bin/ruff check . && .venv/bin/ruff format --check .
  echo "== mypy --strict"; .venv/bin/mypy coordinator sender_node client_sdk mailers tests bench
  echo "== buf lint"; .tools/node_modules/.bin/buf lint
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
    exec .venv/bin/pytest "${@:2}"
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
    sed -n '2,7p' "$0"
    exit 2
    ;;
esac
