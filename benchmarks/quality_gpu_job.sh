# Quality runs at 25% cache behind the 2026-11-23 23:00 UTC rows of benchmarks/results/quality.md (issue 3's 25%
# target): run from the repository root on the GPU machine after the SmolLM2 staging of scripts/README_GPU.md,
# one part per call (each under 10 minutes on an H100):
#
#     PART=a bash benchmarks/quality_gpu_job.sh   # the original uptrained (saved as the teacher), then distillation
#                                                 # from it with the hidden-state term, and with half LM loss
#     PART=b bash benchmarks/quality_gpu_job.sh   # a 4x learning rate for the latent projections (LM, distill);
#                                                 # rope_chunks=2 (LM)
#     PART=c bash benchmarks/quality_gpu_job.sh   # latent_allocation="energy": training-free and uptrained (LM)
#     source benchmarks/quality_gpu_job.sh; q --only ... --variant ...   # any other row, same recipe
#
# Every row uses the main table's recipe (10M tokens, batch 32 x 512, lr 1e-4) and the committed state file as
# its start, so $OUT/quality_state.json is the whole table (copied after every row; the log beside it).
source scripts/gpu_env.sh || echo "[job] gpu_env.sh incomplete (SmolLM2 not staged?)"
export TQDM_DISABLE=1 PYTHONUNBUFFERED=1
OUT=${OUT:?set OUT to the output folder}
STATE=/root/bench/quality_state.json
TEACHER=/root/saved/original-uptrained
mkdir -p /root/bench /root/saved
[ -f "$STATE" ] || cp benchmarks/results/quality_state.json "$STATE"
q() {  # q QUALITY_ARGS...: one uptrain row of benchmarks/quality.py; state and log copied to $OUT
    echo "[job] $(date -u +%H:%M:%S) quality.py $*" | tee -a /root/bench/log.txt
    python3 benchmarks/quality.py --part uptrain --state "$STATE" --train-tokens 10000000 --batch-size 32 \
        --lr 1e-4 "$@" 2>&1 | grep -v -i "warn" >> /root/bench/log.txt
    echo "[job] exit ${PIPESTATUS[0]}" | tee -a /root/bench/log.txt
    grep -E "^\{\"method|^trained|^losses" /root/bench/log.txt | tail -n 3
    cp "$STATE" /root/bench/log.txt "$OUT/"
}
case "${PART:-}" in
a) q --only original --save-dir /root/saved
   q --only elitekv0.25:distill --teacher-dir "$TEACHER" --hidden-weight 1 --variant hidden=1
   q --only elitekv0.25:distill --teacher-dir "$TEACHER" --distill-weight 0.5 --variant distill_weight=0.5 ;;
b) q --only elitekv0.25:lm --latent-lr-ratio 4 --variant latent_lr=4x
   q --only elitekv0.25:distill --teacher-dir "$TEACHER" --latent-lr-ratio 4 --variant latent_lr=4x
   q --only elitekv0.25:lm --config-overrides '{"rope_chunks": 2}' --variant rope_chunks=2 ;;
c) python3 benchmarks/quality.py --part training_free --state "$STATE" --only elitekv0.25 \
       --config-overrides '{"latent_allocation": "energy"}' --variant latent_allocation=energy 2>&1 \
       | grep -v -i "warn" >> /root/bench/log.txt
   grep -E "^\{\"method" /root/bench/log.txt | tail -n 1
   q --only elitekv0.25:lm --config-overrides '{"latent_allocation": "energy"}' --variant latent_allocation=energy ;;
"") ;;
*) echo "[job] unknown PART=$PART" ;;
esac
