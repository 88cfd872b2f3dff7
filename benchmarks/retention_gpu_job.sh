# Retention rows of issue 18 (benchmarks/retention.py) on one H200: run from the repository root on the GPU machine
# after the SmolLM2 staging of scripts/README_GPU.md, with .stage/corpora carried (it holds the unseen evaluation
# corpora: manpages, gnustandards, fortunes). One part per call of at most 10 minutes:
#
#     PART=a OUT=$OUT bash benchmarks/retention_gpu_job.sh   # original; EliteKV 25% / 12.5% / 50% and GQA 33%
#                                                            # training-free; EliteKV 25% "default" (`elitekv run`)
#     PART=b ...   # EliteKV 25% distill
#     PART=c ...   # the self-generated text of "selfgen" (cached on this machine, its minutes kept for the row)
#     PART=d ...   # EliteKV 25% selfgen (reads part c's text while the machine is the same one, else makes it)
#     PART=e ...   # EliteKV 25% broad (distillation on pydocs + linuxdoc + pgdocs)
#     PART=f ...   # GQA 33% distill (the baseline of the 12.5% goal)
#     PART=g ...   # EliteKV 12.5% distill
#     PART=h ...   # EliteKV 50% distill
#     PART=i ...   # the original fine-tuned with LM loss (domain adaptation, for reference)
#     PART=j ...   # LoRC 25% distill, 20M tokens (keeps RoPE on every key dim: against distill (20M))
#     PART=k ...   # EliteKV 25% distill, 20M tokens, r=2 / d_c=84 (a larger latent than the default's)
#     PART=l ...   # EliteKV 25% distill, 70M tokens (the goal's whole 20 GPU minutes; resume it over three calls)
#     PART=m ...   # EliteKV 25% distill, 20M tokens, progressive conversion in 3 stages (against distill (20M))
#     PART=n ...   # EliteKV 25% broad, 20M tokens (against distill (20M))
#     PART=o ...   # EliteKV 25% distill, 20M tokens, only the attention trained (MLPs, norms, embeddings frozen)
#     PART=p ...   # EliteKV 25% distill, 20M tokens, rotary chunks spread over layers by sensitivity
#     PART=q ...   # the recipes of m, p, o, n at 3M tokens each (against the 3M-r4 control), about 6 minutes
#     PART=r ...   # the attention objective of the chunk search, with and without the sensitivity budgets, 3M tokens
#     PART=s ...   # EliteKV 25% distill, 30M tokens (the default's), rotary chunks spread by sensitivity
#     PART=t ...   # part s with the attention objective of the chunk search, compiled: the candidate default
#     source benchmarks/retention_gpu_job.sh; r --rows elitekv:0.25:distill --set train_tokens=10000000 --tag 10M
#
# A row whose training does not end within LIMIT minutes (default 8) of its command's start saves a checkpoint under
# /root/bench/retention/checkpoints and stops ("stopped at step ..." in the output): call the same PART again on the
# same warm machine and it resumes there (gpu_minutes adds the calls up, conversion counted once; rows already in the
# table are skipped, so repeat a part with other knobs through `r ... --tag`). Rows accumulate
# in /root/bench/retention/retention.json while the machine stays warm; after every command the .json/.md (and the
# .png where matplotlib is installed) and the log are copied to $OUT. Merge the calls' files here afterwards:
#     python benchmarks/retention.py merge runs/a/retention.json runs/b/retention.json ... --out benchmarks/results
source scripts/gpu_env.sh || echo "[job] gpu_env.sh incomplete (SmolLM2 not staged?)"
export TQDM_DISABLE=1 PYTHONUNBUFFERED=1
OUT=${OUT:?set OUT to the output folder}
corpora_parent=${ELITEKV_CORPORA_PARENT:-/root/corpora}
export ELITEKV_MANPAGES_DIR=${ELITEKV_MANPAGES_DIR:-$corpora_parent/manpages}
export ELITEKV_GNUSTANDARDS_DIR=${ELITEKV_GNUSTANDARDS_DIR:-$corpora_parent/gnustandards}
export ELITEKV_FORTUNES_DIR=${ELITEKV_FORTUNES_DIR:-$corpora_parent/fortunes}
for dir in "$ELITEKV_MANPAGES_DIR" "$ELITEKV_GNUSTANDARDS_DIR" "$ELITEKV_FORTUNES_DIR"; do
    [ -d "$dir" ] || echo "[job] $dir is missing: build .stage/corpora here (python scripts/stage_gpu.py" \
        "--corpora-only) and carry it in a call (carry=[\".stage/corpora\"])"
done
STATE=/root/bench/retention
mkdir -p "$STATE"
r() {  # r RETENTION_RUN_ARGS...: benchmarks/retention.py run into $STATE; results and log copied to $OUT
    echo "[job] $(date -u +%H:%M:%S) retention.py run $*" | tee -a "$STATE/log.txt"
    python3 benchmarks/retention.py run --out "$STATE" --time-limit "${LIMIT:-8}" --skip-done "$@" 2>&1 \
        | grep -v -i "warn" >> "$STATE/log.txt"
    echo "[job] exit ${PIPESTATUS[0]} at $(date -u +%H:%M:%S)" | tee -a "$STATE/log.txt"
    grep -E '^\{"method|^\[retention\]|Error|error:' "$STATE/log.txt" | tail -n 4 | cut -c1-600
    cp "$STATE"/retention.json "$STATE"/retention.md "$STATE"/retention.png "$STATE"/log.txt "$OUT/" 2>/dev/null
}
rp() {  # rp NAME RETENTION_RUN_ARGS...: like r, in the background, into its own folder and token cache. Call `wait`
    # after the last one; the rows land in $OUT/NAME/. Not faster: four rows at once on an H200 (2026-12-02) made
    # no more training steps a minute in total than one row alone, and each row's gpu_minutes is its own wall
    # clock on the shared GPU (note it in the table).
    local name=$1 state=/root/bench/retention_$1
    shift
    mkdir -p "$state" "$OUT/$name"
    (
        export ELITEKV_CACHE=/root/.cache/elitekv_peft_$name
        echo "[job] $(date -u +%H:%M:%S) $name: retention.py run $*" >> "$state/log.txt"
        python3 benchmarks/retention.py run --out "$state" --time-limit "${LIMIT:-8}" --skip-done --no-plot "$@" 2>&1 \
            | grep -v -i "warn" >> "$state/log.txt"
        echo "[job] $name exit ${PIPESTATUS[0]} at $(date -u +%H:%M:%S)" | tee -a "$state/log.txt"
        grep -E '^\[retention\]|Error|error:' "$state/log.txt" | tail -n 3 | cut -c1-400
        cp "$state"/retention.json "$state"/retention.md "$state"/log.txt "$OUT/$name/" 2>/dev/null
    ) &
}
case "${PART:-}" in
a) r --rows original,elitekv:0.25:none,gqa:0.3333:none,elitekv:0.125:none,elitekv:0.5:none,elitekv:0.25:default ;;
b) r --rows elitekv:0.25:distill ;;
c) r --rows elitekv:0.25:selfgen --pregenerate ;;
d) r --rows elitekv:0.25:selfgen ;;
e) r --rows elitekv:0.25:broad ;;
f) r --rows gqa:0.3333:distill ;;
g) r --rows elitekv:0.125:distill ;;
h) r --rows elitekv:0.5:distill ;;
i) r --rows original:1:lm ;;
j) r --rows lorc:0.25:distill --set train_tokens=20000000 --tag 20M ;;
k) r --rows elitekv:0.25:distill --set train_tokens=20000000 --set rope_chunks=2 --tag 20M-r2 ;;
l) LIMIT=${LIMIT:-9.3} r --rows elitekv:0.25:distill --set train_tokens=70000000 --tag 70M ;;  # the whole 20 minutes: 3 calls
m) r --rows elitekv:0.25:distill --set train_tokens=20000000 --set progressive_stages=3 --tag 20M-prog3 ;;
n) r --rows elitekv:0.25:broad --set train_tokens=20000000 --tag 20M ;;
o) r --rows elitekv:0.25:distill --set train_tokens=20000000 --set trainable=attention --tag 20M-attn ;;
p) r --rows elitekv:0.25:distill --set train_tokens=20000000 --set rope_allocation=sensitivity --tag 20M-ropesens ;;
q) r --rows elitekv:0.25:distill --set train_tokens=3000000 --set rope_allocation=sensitivity --tag 3M-ropesens
   r --rows elitekv:0.25:distill --set train_tokens=3000000 --set progressive_stages=3 --tag 3M-prog3
   r --rows elitekv:0.25:distill --set train_tokens=3000000 --set trainable=attention --tag 3M-attn
   r --rows elitekv:0.25:broad --set train_tokens=3000000 --tag 3M ;;
r) r --rows elitekv:0.25:distill --set train_tokens=3000000 --set selection_objective=attention --tag 3M-attnobj
   r --rows elitekv:0.25:distill --set train_tokens=3000000 --set selection_objective=attention \
       --set rope_allocation=sensitivity --tag 3M-attnobj-ropesens ;;
s) r --rows elitekv:0.25:distill --set train_tokens=30000000 --set rope_allocation=sensitivity --tag 30M-ropesens ;;
t) r --rows elitekv:0.25:distill --set train_tokens=30000000 --set rope_allocation=sensitivity \
       --set selection_objective=attention --set torch_compile=true --tag 30M-attnobj-ropesens-compiled ;;
"") ;;
*) echo "[job] unknown PART=$PART" ;;
esac
