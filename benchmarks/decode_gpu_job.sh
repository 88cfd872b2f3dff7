# The GPU job behind benchmarks/results/decode.*: run from the repository root on the GPU machine (H100) after the
# SmolLM2 staging of scripts/README_GPU.md (needed only for the greedy match). One part per call, each well under
# the 10-minute limit of a device command (every python run has a --time-limit for starting rows and a `timeout`
# around it; rows are saved as they finish, so a stopped part keeps what it measured). In order of priority:
#
#     PART=a bash benchmarks/decode_gpu_job.sh   # 7B shape, 25%, 32k x batch 3 (no largest-batch search, see
#                                                # PART=search; the report takes them from any run): --tune over
#                                                # both kernel variants, StaticCache+torch.compile (reduce-overhead, and
#                                                # Inductor's default mode captured by hand) / DynamicCache /
#                                                # StaticCache+graph baselines, the EliteKV step compiled both ways
#                                                # and graph-captured, all in one process, profiled (~4-5 min)
#     PART=search bash benchmarks/decode_gpu_job.sh  # the largest batches at 32k (DynamicCache, StaticCache, EliteKV
#                                                # 25%) with their rows (duration not yet logged on its own)
#     PART=check bash benchmarks/decode_gpu_job.sh  # kernels vs a float64 reference on the GPU, both variants,
#                                                # bf16 and float32 (passed on 2026-11-23; it took most of a
#                                                # 400 s run together with the largest-batch searches)
#     PART=b bash benchmarks/decode_gpu_job.sh   # 7B shape, 32k x batch 3: StaticCache + torch.compile baseline alone
#     PART=c bash benchmarks/decode_gpu_job.sh   # 7B shape, 32k x batch 3: EliteKV 25% absorbed step under
#                                                # torch.compile (~5 min)
#     PART=d bash benchmarks/decode_gpu_job.sh   # 7B shape, 12.5% and 50%: 32k x batch 3 + largest batch (~6 min)
#     PART=e bash benchmarks/decode_gpu_job.sh   # 7B shape, 8k and 2k contexts, batches 1 and 4, all ratios (~6 min)
#     PART=f bash benchmarks/decode_gpu_job.sh   # SmolLM2 shape, all ratios (~6 min)
#     PART=s bash benchmarks/decode_gpu_job.sh   # 7B shape, 32k x batch 3, 25% with an S-LRD latent (keys and values
#                                                # in halves of it, so the two-phase kernel reads each cache byte
#                                                # once), tuned, against the same baselines in one process (~4 min)
#     PART=h bash benchmarks/decode_gpu_job.sh   # 7B shape, 8k and 2k x batch 1, 25%: the compiled-and-captured
#                                                # rows on both sides (at short contexts the kernel graph was slower
#                                                # than the StaticCache graph: 11.0 vs 8.7 ms at 2k)
#     PART=g bash benchmarks/decode_gpu_job.sh   # greedy match on SmolLM2 with the kernel path (float32)
#     PART=k bash benchmarks/decode_gpu_job.sh   # the kernels alone (benchmarks/decode_kernel.py): single-pass J-LRD
#                                                # kernel (tuned) vs the two-phase one, 7B shape, 32k,
#                                                # batches 3, 1 and the largest that fits, 25% and 50%, GB/s and
#                                                # fraction of the same run's copy bandwidth, on-device check; then the
#                                                # SmolLM2 greedy match (float32) if staged (< 8 min in all)
#
# Then, on any machine:
#
#     python benchmarks/decode.py report $OUT/decode_7b_a.json $OUT/decode_7b_b.json $OUT/decode_7b_c.json \
#         $OUT/decode_7b_d.json $OUT/decode_7b_e.json $OUT/decode_smollm2.json --out benchmarks/results/decode.json
#
# (leave out the files of parts that did not run). Part a decides the kernel variant: its JSON's "kernel_tuning"
# lists every configuration tried (GB/s), "chosen" and the chosen launches' "breakdown"; parts c to f tune again at
# their start (about a minute), so each process uses the fastest configuration. On 2026-11-23 the two-phase
# variant was fastest (its tuned blocks are the defaults); the float32 check that once hung compiling ever smaller
# single-pass blocks passed after the `smaller_config` fix.
# To save device time, run the wheels-only set-up in the same call as part a (scripts/README_GPU.md).
source scripts/gpu_env.sh || echo "[job] gpu_env.sh incomplete (SmolLM2 not staged?)"
export PYTHONPATH=${ELITEKV_SITE:-/tmp/site}:$PWD TQDM_DISABLE=1 PYTHONUNBUFFERED=1
OUT=${OUT:?set OUT to the output folder}
SEVEN="--shapes llama2-7b-shape --contexts 32768 --batches 3"
run() {  # run NAME ARGS...: one decode.py process, killed at 570 s
    local name=$1
    shift
    timeout 570 python3 benchmarks/decode.py "$@" --out "$OUT/$name.json" --log "$OUT/$name.jsonl" > "$OUT/$name.log" 2>&1
    echo "[job] $name: exit $?"
    tail -n 2 "$OUT/$name.log"
}
case "${PART:?set PART to a, check, search, b, c, d, e, f, g, h, k or s}" in
a) run decode_7b_a $SEVEN --ratios 0.25 --tune --search none \
       --baselines baseline_compiled,baseline_compiled_graph,baseline_dynamic,baseline_static \
       --paths absorbed_compiled,absorbed_compiled_graph,absorbed_kernel --compile-budget 150 --time-limit 420 \
       --profile ;;
check) run decode_check $SEVEN --check --search none --baselines "" --paths "" ;;
search) run decode_7b_search $SEVEN --ratios 0.25 --search all --baselines baseline_dynamic,baseline_static \
       --paths absorbed_kernel --time-limit 400 ;;
b) run decode_7b_b $SEVEN --search none --baselines baseline_compiled --paths "" --compile-budget 420 \
       --time-limit 60 ;;
c) run decode_7b_c $SEVEN --ratios 0.25 --search none --baselines "" --paths absorbed_compiled --tune \
       --compile-budget 400 --time-limit 60 ;;
d) run decode_7b_d $SEVEN --ratios 0.125,0.5 --search elitekv --tune --compare-variants \
       --baselines baseline_static --paths absorbed_kernel --time-limit 360 ;;
e) run decode_7b_e --shapes llama2-7b-shape --contexts 8192,2048 --batches 1,4 --ratios 0.25,0.125,0.5 \
       --search none --tune --baselines baseline_dynamic,baseline_static --paths absorbed_kernel,reconstruct \
       --time-limit 360 ;;
f) run decode_smollm2 --shapes smollm2-135m-shape --contexts 32768,8192,2048 --batches 1,4 --ratios 0.25,0.125,0.5 \
       --tune --compare-variants --baselines baseline_dynamic,baseline_static \
       --paths absorbed_kernel,reconstruct --time-limit 360 ;;
s) run decode_7b_s $SEVEN --ratios 0.25 --decomposition separate --tune --search none \
       --baselines baseline_compiled_graph,baseline_dynamic,baseline_static \
       --paths absorbed_compiled_graph,absorbed_kernel --compile-budget 150 --time-limit 420 ;;
h) run decode_7b_h --shapes llama2-7b-shape --contexts 8192,2048 --batches 1 --ratios 0.25 --search none \
       --baselines baseline_static,baseline_compiled_graph --paths absorbed_kernel,absorbed_compiled_graph \
       --compile-budget 200 --time-limit 420 ;;
g) if ls "${ELITEKV_SMOLLM2_DIR:-/root/smollm2}"/*.gguf > /dev/null 2>&1; then
       timeout 570 python3 benchmarks/greedy_match.py --dtype float32 --out "$OUT/greedy_match_kernel_fp32.json" \
           > "$OUT/greedy.log" 2>&1
       tail -n 3 "$OUT/greedy.log"
   else
       echo "[job] SmolLM2 not staged: greedy match skipped"
   fi ;;
k) # KERNEL_ARGS: extra arguments (a CPU check of this part: "--device cpu --shape tiny-shape --context 40 ...")
   timeout 300 python3 benchmarks/decode_kernel.py --time-limit 200 --tune-limit 70 ${KERNEL_ARGS:-} \
       --out "$OUT/decode_kernel.json" > "$OUT/decode_kernel.log" 2>&1
   echo "[job] decode_kernel: exit $?"
   tail -n 3 "$OUT/decode_kernel.log"
   if ls "${ELITEKV_SMOLLM2_DIR:-/root/smollm2}"/*.gguf > /dev/null 2>&1; then
       timeout 120 python3 benchmarks/greedy_match.py --dtype float32 \
           --out "$OUT/greedy_match_single_pass_fp32.json" > "$OUT/greedy.log" 2>&1
       echo "[job] greedy_match: exit $?"
       tail -n 2 "$OUT/greedy.log"
   else
       echo "[job] SmolLM2 not staged: greedy match skipped"
   fi ;;
*) echo "[job] unknown PART=$PART" ;;
esac
