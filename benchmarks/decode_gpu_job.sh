# The GPU job behind benchmarks/results/decode.*: run from the repository root on the GPU machine after the
# SmolLM2 staging of scripts/README_GPU.md (without it, the greedy match is skipped). Time limits in seconds:
# T7 (Llama-2-7B shape), TS (SmolLM2 shape, 0 = skip); GREEDY=0 skips the greedy match.
#
#     T7=400 TS=200 bash benchmarks/decode_gpu_job.sh
#     python benchmarks/decode.py report $OUT/decode_7b.json $OUT/decode_smollm2.json --out benchmarks/results/decode.json
source scripts/gpu_env.sh || echo "[job] gpu_env.sh incomplete (SmolLM2 not staged?)"
export PYTHONPATH=${ELITEKV_SITE:-/tmp/site}:$PWD TQDM_DISABLE=1 PYTHONUNBUFFERED=1
python3 benchmarks/decode.py --check --tune --shapes llama2-7b-shape --ratios 0.25,0.125,0.5 --time-limit "${T7:-400}" \
    --out "$OUT/decode_7b.json" --log "$OUT/decode_7b.jsonl" > "$OUT/decode_7b.log" 2>&1
if [ "${TS:-200}" -gt 0 ]; then
    python3 benchmarks/decode.py --shapes smollm2-135m-shape --ratios 0.25,0.125,0.5 --time-limit "${TS:-200}" \
        --out "$OUT/decode_smollm2.json" --log "$OUT/decode_smollm2.jsonl" > "$OUT/decode_smollm2.log" 2>&1
fi
if [ "${GREEDY:-1}" = 1 ] && ls "${ELITEKV_SMOLLM2_DIR:-/root/smollm2}"/*.gguf > /dev/null 2>&1; then
    python3 benchmarks/greedy_match.py --dtype float32 --out "$OUT/greedy_match_kernel_fp32.json" > "$OUT/greedy.log" 2>&1
fi
tail -n 3 "$OUT"/*.log
