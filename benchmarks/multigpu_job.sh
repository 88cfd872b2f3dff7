# Multi-GPU uptraining runs behind benchmarks/results/multigpu.md: run from the repository root on a lent
# `nvidia-h200-x2` (2 GPUs of one host), one part per call. The real-model parts need the SmolLM2 staging of
# scripts/README_GPU.md on that machine first (two calls); the tiny parts need only the wheels.
#
#     PART=tiny bash benchmarks/multigpu_job.sh   # DDP, FSDP1 and FSDP2 (Trainer), FSDP2 (TRL's SFTTrainer), tiny
#                                                 # random Llama (about 1.5 minutes)
#     PART=real bash benchmarks/multigpu_job.sh   # DDP and FSDP2 (Trainer), FSDP2 (SFTTrainer): SmolLM2-135M on the
#                                                 # Python docs, 2M tokens each (about 2.5 minutes)
#
# FSDP1 (with accelerate's default CPU-RAM-efficient loading) is left out of the real part: SmolLM2 ties lm_head to
# its embeddings, and that failed (elitekv_peft/distributed.py refuses it now). Then, on any machine, with the $OUT files in
# benchmarks/results/multigpu_runs/: python benchmarks/multigpu_report.py benchmarks/results/multigpu_runs ...
#
# Every run saves its artifact, loads it back with AutoModelForCausalLM on the main process and evaluates it on
# the same held-out windows (--check-reload: "reloaded" next to "uptrained_lm" in its summary.json). Each run's
# summary.json and log land in $OUT.
source scripts/gpu_env.sh || echo "[job] gpu_env.sh incomplete (SmolLM2 not staged?)"
export PYTHONPATH=${ELITEKV_SITE:-/tmp/site}:$PWD TQDM_DISABLE=1 PYTHONUNBUFFERED=1
# NVLink multicast off (the device README's KINDS.md)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:?set OUT to the output folder}
FSDP="--use_fsdp --fsdp_sharding_strategy FULL_SHARD --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP
      --fsdp_transformer_layer_cls_to_wrap LlamaDecoderLayer --fsdp_state_dict_type FULL_STATE_DICT"
# FSDP2 (fully_shard): TRL's SFTTrainer needs it, its fused LM head reads lm_head.weight outside FSDP1's unsharded
# forward (RuntimeError: mat2 must be a matrix, TRL 1.16, run on 2026-11-23)
FSDP2="--use_fsdp --fsdp_version 2 --fsdp_reshard_after_forward true --fsdp_cpu_ram_efficient_loading false
      --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP
      --fsdp_transformer_layer_cls_to_wrap LlamaDecoderLayer --fsdp_state_dict_type FULL_STATE_DICT"
launch() {  # launch NAME LIMIT_S EXAMPLE ACCELERATE_ARGS... -- EXAMPLE_ARGS...: one accelerate launch of
            # examples/EXAMPLE, killed at LIMIT_S
    local name=$1 limit=$2 example=$3
    shift 3
    local accel=()
    while [ "$1" != "--" ]; do accel+=("$1"); shift; done
    shift
    timeout "$limit" python3 -m accelerate.commands.launch --num_processes 2 --mixed_precision no "${accel[@]}" \
        "examples/$example" --no-progress --check-reload --out "/tmp/$name" "$@" > "$OUT/$name.log" 2>&1
    echo "[job] $name: exit $?"
    cp "/tmp/$name/summary.json" "$OUT/$name.summary.json" 2> /dev/null
    grep "\[uptrain" "$OUT/$name.log" | tail -n 3
}
case "${PART:?set PART to tiny or real}" in
tiny) launch ddp_tiny 150 uptrain.py --multi_gpu -- --tiny --train-tokens 40000
      launch fsdp_tiny_ramload 150 uptrain.py $FSDP -- --tiny --train-tokens 40000
      launch fsdp2_tiny 150 uptrain.py $FSDP2 -- --tiny --train-tokens 40000
      launch fsdp2_trl_tiny 150 uptrain_trl.py $FSDP2 -- --tiny --train-tokens 40000 --no-gradient-checkpointing ;;
real) launch ddp_real 270 uptrain.py --multi_gpu -- --train-tokens 2000000 --eval-windows 200
      launch fsdp2_real 270 uptrain.py $FSDP2 -- --train-tokens 2000000 --eval-windows 200
      launch fsdp2_trl_real 270 uptrain_trl.py $FSDP2 -- --train-tokens 2000000 --eval-windows 200 ;;
*) echo "[job] unknown PART=$PART" ;;
esac
