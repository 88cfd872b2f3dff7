# Source this at the start of every command on the GPU machine, from the repo root:
#
#     source scripts/gpu_env.sh || exit
#
# It (1) keeps a carried .stage/part1 in /root/stage (call 1), (2) with a carried .stage/part2
# joins and verifies the GGUF into /root/smollm2, unpacks the Python docs into
# /root/pydocs/_sources and pip-installs the carried wheels into /tmp/site (call 2), skipping
# whatever is already in place, (3) with a carried .stage/corpora unpacks the extra training corpora
# into /root/corpora/<name>, and (4) exports PYTHONPATH, ELITEKV_SMOLLM2_DIR, ELITEKV_PYDOCS_DIR,
# ELITEKV_LINUXDOC_DIR, ELITEKV_PGDOCS_DIR and ELITEKV_CACHE.  It returns non-zero if a piece is
# missing or corrupt.
# See scripts/README_GPU.md.

export ELITEKV_HOLD="${ELITEKV_HOLD:-/root/stage}"
export ELITEKV_SMOLLM2_DIR="${ELITEKV_SMOLLM2_DIR:-/root/smollm2}"
export ELITEKV_PYDOCS_PARENT="${ELITEKV_PYDOCS_PARENT:-/root/pydocs}"
export ELITEKV_PYDOCS_DIR="${ELITEKV_PYDOCS_DIR:-$ELITEKV_PYDOCS_PARENT/_sources}"
export ELITEKV_CORPORA_PARENT="${ELITEKV_CORPORA_PARENT:-/root/corpora}"
export ELITEKV_LINUXDOC_DIR="${ELITEKV_LINUXDOC_DIR:-$ELITEKV_CORPORA_PARENT/linuxdoc}"
export ELITEKV_PGDOCS_DIR="${ELITEKV_PGDOCS_DIR:-$ELITEKV_CORPORA_PARENT/pgdocs}"
export ELITEKV_SITE="${ELITEKV_SITE:-/tmp/site}"
export ELITEKV_CACHE="${ELITEKV_CACHE:-/root/.cache/elitekv_peft}"
export PYTHONUNBUFFERED=1

python3 scripts/gpu_unstage.py || return 1

case ":${PYTHONPATH:-}:" in
    *":$ELITEKV_SITE:"*) ;;
    *) export PYTHONPATH="$ELITEKV_SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" ;;
esac

python3 - <<'PY' || return 1
import importlib.metadata as md
names = ["torch", "transformers", "peft", "trl", "datasets", "gguf", "accelerate", "huggingface_hub",
         "tokenizers", "safetensors", "pyarrow", "fsspec", "dill", "multiprocess", "numpy", "bitsandbytes"]
found = []
for n in names:
    try:
        found.append(f"{n} {md.version(n)}")
    except md.PackageNotFoundError:
        found.append(f"{n} -")
print("[gpu_env] " + ", ".join(found), flush=True)
PY
