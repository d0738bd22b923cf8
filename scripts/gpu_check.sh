#!/usr/bin/env bash
# The GPU path, on a machine with a CUDA GPU (CI has none, so its tests skip tests/test_gpu.py):
#
#   bash scripts/gpu_check.sh [STEP ...]      steps: tests demo bench (default: all three)
#
#   tests  pytest tests/test_gpu.py (each train.precision on the GPU, float32 weights published, the
#          same predictions on the GPU and the CPU, more processes than GPUs refused, a sweep's trials
#          freed from the GPU one by one), then tests/test_finetune.py and tests/test_sweep.py as they
#          run on a GPU (resume, reuse, tables, class weights, label smoothing, activation checkpointing,
#          pruning... in bf16 by train.precision=auto)
#   demo   the README's main job (`pipeline run`, configs/demo.yaml: the packaged MiniLM, train.precision
#          auto) in a fresh tracking folder, then `reproduce --check` of the model it made: whether a GPU
#          retrains it bit for bit, and if not how far its test metrics move
#   bench  scripts/bench_finetune.py on the demo config: the stage against a plain Trainer, in
#          train.precision=auto and in fp32
#
# Each step's whole output goes to $GPU_CHECK_OUT/<step>.log (default gpu-check/); the end of it and
# the step's exit status and seconds are printed. PYTHON picks the interpreter (default: python3).
set -u
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
out=${GPU_CHECK_OUT:-gpu-check}
mkdir -p "$out"
export WANDB_MODE=offline WANDB_SILENT=true PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(tests demo bench)

"$python" - <<'EOF' || exit 1
import torch
if not torch.cuda.is_available():
    raise SystemExit("gpu_check: torch sees no CUDA GPU")
p = torch.cuda.get_device_properties(0)
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}: {p.name}, {p.total_memory / 2**30:.0f} GiB, "
      f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}")
EOF

run_step() {  # NAME SECONDS COMMAND...: the command under a time limit, logged; its status is returned
    local name=$1 limit=$2 start rc
    shift 2
    echo "== $name: $*"
    start=$(date +%s)
    timeout "$limit" "$@" >>"$out/$name.log" 2>&1
    rc=$?
    tail -n 25 "$out/$name.log"
    echo "== $name: exit $rc after $(($(date +%s) - start)) s"
    return $rc
}

status=0
for step in "${steps[@]}"; do
    case $step in
    tests)
        run_step tests-gpu 240 "$python" -m pytest -q -p no:cacheprovider tests/test_gpu.py || status=1
        run_step tests-finetune 420 "$python" -m pytest -q -p no:cacheprovider --durations=5 tests/test_finetune.py \
            || status=1
        run_step tests-sweep 300 "$python" -m pytest -q -p no:cacheprovider tests/test_sweep.py || status=1
        ;;
    demo)
        work=$(mktemp -d)
        run_step demo 300 "$python" -m pipeline run --config configs/demo.yaml --set "tracking.dir=$work/track" \
            --set "deploy.dir=$work/deploy" || status=1
        "$python" - "$work/track" <<'EOF' | tee -a "$out/demo.log"
import json, sys
from pipeline.registry.local import LocalRegistry
v = LocalRegistry(sys.argv[1] + "/registry").resolve("intent-classifier:latest")
m = v.metadata
print(f"demo model {v.ref} {json.dumps(m['training'])}\nvalidation (best) {json.dumps(m['metrics']['best'])}\n"
      f"test {json.dumps((m.get('evaluation') or {}).get('metrics'))}\naliases {v.aliases}")
EOF
        run_step reproduce 240 "$python" -m pipeline reproduce intent-classifier:v0 --check --config configs/demo.yaml \
            --set "tracking.dir=$work/track" || status=1
        rm -rf "$work"
        ;;
    bench)
        run_step bench 300 "$python" scripts/bench_finetune.py --repeat 3 || status=1
        run_step bench-fp32 300 "$python" scripts/bench_finetune.py --repeat 3 --set train.precision=fp32 || status=1
        ;;
    *)
        echo "gpu_check: unknown step $step (steps: tests demo bench)" >&2
        exit 2
        ;;
    esac
done
exit $status
