#!/usr/bin/env bash
# Installs everything the test suite needs into ./.venv (created if missing) and runs it.
#
#   bash tests/run_all.sh [extra pytest args]
#
# Needs Python 3.11. As root it also installs Debian's chromium for the browser test.
# Data: SAMREF_DATA_DIR (default ../shared/data) must hold GrabCut/ and COCO_MVal/.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = "0" ] && ! command -v chromium >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
    >/tmp/samref_apt.log 2>&1 || echo "warning: could not install chromium (see /tmp/samref_apt.log)"
fi

PY=${PYTHON:-python3}
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
python -m pip install -q --upgrade pip
python -m pip install -q -e '.[test,demo]'

export SAMREF_DATA_DIR=${SAMREF_DATA_DIR:-$(cd .. && pwd)/shared/data}
export SAMREF_ARTIFACTS=${SAMREF_ARTIFACTS:-$PWD/artifacts}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$PWD/.jax_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-1}
ruff check samref_jax train configs benchmarks tests convert_weights.py
python -m pytest -q -rs --durations=25 "$@"
