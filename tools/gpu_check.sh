#!/usr/bin/env bash
# The checks only a CUDA GPU can make, into one report file, each step under its own limit (590 s in all):
#   bash tools/gpu_check.sh [REPORT]        (default gpu_report.md; DEVICE=cuda:1 picks another GPU)
# The gpu tests, a short float16 training on generated cars, bench.py, bench.py --memory measured by
# the CUDA allocator, and full-size prediction of the held-out cars, each step under its own limit.
set -uo pipefail
cd "$(dirname "$0")/.."
report=$(realpath -m "${1:-gpu_report.md}")
device=${DEVICE:-cuda}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failures=0

step() {  # step TITLE SECONDS COMMAND...: the command's output under its title, its status counted
    local title=$1 seconds=$2 started status
    shift 2
    started=$(date +%s)
    printf '\n## %s\n\n```\n$ %s\n' "$title" "$*" >>"$report"
    timeout "$seconds" "$@" >>"$report" 2>&1
    status=$?
    printf '```\nexit %s after %s s\n' "$status" "$(($(date +%s) - started))" >>"$report"
    [ "$status" -eq 0 ] || failures=$((failures + 1))
    echo "$title: exit $status"
}

printf '# GPU check, %s\n' "$(date -u '+%Y-%m-%d %H:%M UTC')" >"$report"
step "device" 30 python -c "import torch; print(torch.__version__, torch.version.cuda, \
torch.cuda.get_device_name('$device'), torch.cuda.get_device_properties('$device')); \
print('free, total bytes:', torch.cuda.mem_get_info('$device'))"
step "gpu tests" 150 python -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py
step "demo data" 30 python -c "import synthetic; synthetic.make_synthetic('$work/data', cars=8, progress=False)"
step "float16 training, 3 epochs of the 31M UNet" 90 python train.py --DATA_DIR="$work/data" \
    --CHECKPOINT_DIR="$work/run" --SAVED_IMAGES="$work/pictures" --CACHE_DIR="$work/cache" \
    --NUM_EPOCHS=3 --AMP_DTYPE=float16 --DEVICE="$device"
step "full-size prediction of the held-out cars" 40 python predict.py --checkpoint "$work/run/best.pt" \
    --input "$work/run/val_files.txt" --masks "$work/data/train_masks" --output "$work/predictions" \
    --device "$device"
step "bench.py" 100 python bench.py --no-compile --device "$device"
step "bench.py --memory" 150 python bench.py --memory --device "$device"
echo "report: $report ($failures step(s) failed)"
exit $((failures > 0))
