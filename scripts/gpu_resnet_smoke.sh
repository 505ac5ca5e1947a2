#!/usr/bin/env bash
# GPU smoke test: the cifar10-resnet18 preset end to end on generated CIFAR-10 files (no download):
# write the files, record a short run group on the GPU, replay every run there (adam-fresh, the
# paper's update), analyze the group. Prints each stage's wall time; the report is in
# OUT/run/analysis/report.html.
#
#   bash scripts/gpu_resnet_smoke.sh [OUT]          # OUT defaults to smoke-out (replaced)
#
# Environment: DEVICE (cuda), PYTHON (.venv/bin/python), PER_CLASS (200 training images per
# class), EPOCHS (2), RUNS (2), PROBES (5 per class). A few minutes on one GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-smoke-out}
DEVICE=${DEVICE:-cuda}
PYTHON=${PYTHON:-.venv/bin/python}
PER_CLASS=${PER_CLASS:-200}
EPOCHS=${EPOCHS:-2}
RUNS=${RUNS:-2}
PROBES=${PROBES:-5}
export MPLBACKEND=Agg

stage() {
  local name=$1
  shift
  local start=$SECONDS
  "$@"
  echo "== $name: $((SECONDS - start)) s"
}

if [[ $DEVICE == cuda* ]]; then
  "$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('GPU:', torch.cuda.get_device_name())"
fi
rm -rf "$OUT"
stage "generate CIFAR-10 files" "$PYTHON" -m recorder.presets.fake_vision cifar10 "$OUT/data" \
  --train-per-class "$PER_CLASS" --test-per-class 50
stage "record" "$PYTHON" cli.py record cifar10-resnet18 "$OUT/run" \
  --set data_root="$OUT/data" --set verify_md5=false --set device="$DEVICE" \
  --set train_per_class="$PER_CLASS" --set test_per_class=50 --set probes_per_class="$PROBES" \
  --set batch_size=64 --set epochs="$EPOCHS" --set runs="$RUNS" --set progress=false
for run in "$OUT"/run/run-*; do
  stage "replay $run" "$PYTHON" cli.py replay "$run" --device "$DEVICE" --no-progress
done
stage "analyze" "$PYTHON" cli.py analyze "$OUT/run" --include-self
