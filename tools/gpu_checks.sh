#!/usr/bin/env bash
# bnrt's CUDA paths, run for real: on a machine with a CUDA GPU, torch built with CUDA and
# onnxruntime-gpu (plus the serving packages for tests/deploy/test_serve.py, and timm for step 3).
#
#     tools/gpu_checks.sh OUTDIR        # about 6 minutes on one H100/H200 with 16 cores
#
# 1. the tests that change on a CUDA machine (ORT CUDA sessions, IO binding, TF32 option, bench's
#    CUDA variants, check with --device cuda);  2. ResNet-50 folded and checked with --provider cuda
#    --device cuda (the informational TF32 row included);  3. timm models, folded and checked on CUDA;
#    4. bnrt bench with its CUDA variants;  5. float32 / INT8 / FP16 latency on ORT CUDA;
#    6. the whole test suite.  Everything is logged to OUTDIR/gpu.log; reports go to OUTDIR/reports.tgz.
set -u
out=${1:-/tmp/bnrt-gpu}
mkdir -p "$out"
work=$(mktemp -d)
py=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec > >(tee -a "$out/gpu.log") 2>&1

step() {  # step NAME SECONDS COMMAND...: run with a time limit, print its exit code and duration
    local name=$1 limit=$2
    shift 2
    echo "=== $name"
    local start=$SECONDS
    timeout "$limit" "$@"
    echo "=== $name: exit $?, $((SECONDS - start)) s"
}

step environment 60 bash -c "nvidia-smi -L; $py -c '
import torch, onnxruntime as ort, onnx
print(\"torch\", torch.__version__, \"cuda\", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"-\")
print(\"onnxruntime\", ort.__version__, ort.get_available_providers(), \"onnx\", onnx.__version__)'"

step "tests that change on CUDA" 300 $py -m pytest -q -p no:cacheprovider -rs --hypothesis-profile=dev -n 8 \
    tests/test_session.py tests/deploy/test_serve.py tests/pipeline/test_bench.py tests/verify/test_metrics.py tests/verify/test_check.py

step "ResNet-50 checkpoint" 120 $py -c "
from pathlib import Path; from tools.bench import pipeline_checkpoint
print(pipeline_checkpoint('resnet50', Path('$work')))"
step "ResNet-50 fold, checked on ORT CUDA and torch CUDA" 300 $py -m bnrt fold "$work/resnet50.pt" --trust-code \
    -o "$work/resnet50" --provider cuda --device cuda
step "ResNet-50 check, the folded ONNX under TF32 (expected to fail: TF32 is a deployment choice)" 300 \
    $py -m bnrt check "$work/resnet50.pt" "$work/resnet50/resnet50.onnx" --trust-code --provider cuda --tf32 on \
    --json "$work/resnet50/tf32.check.json"

for name in resnet50 repvgg_a0 mobileone_s0 levit_128s fastvit_t8; do
    step "timm $name: build" 120 $py -c "
import torch; from tools.real_zoo import build
torch.save(build('timm', '$name')[0], '$work/timm_$name.pt')"
    step "timm $name: fold, checked on CUDA" 300 $py -m bnrt fold "$work/timm_$name.pt" --trust-pickle \
        --input-shape 1,3,224,224 -o "$work/timm_$name" --provider cuda --device cuda
done

step "bnrt bench ResNet-50 (CPU and CUDA variants)" 300 $py -m bnrt bench "$work/resnet50.pt" --trust-code \
    --batch-sizes 1,8 --threads 8 --repeats 3 --iterations 10 --json "$work/bench.json"
step "float32 / INT8 / FP16 on ORT CUDA" 300 $py -m tools.bench_quantize --model resnet50 --providers cuda \
    --batch-sizes 1,8,32 --repeats 3 --iterations 20

(cd "$work" && tar czf "$out/reports.tgz" --exclude='*.onnx' --exclude='*.pt' --exclude='*.ts' .)
step "whole test suite" 240 $py -m pytest -q -p no:cacheprovider -rs --hypothesis-profile=dev -n 14 tests
