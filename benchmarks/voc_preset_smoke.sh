#!/usr/bin/env bash
# The VOC preset (params-voc.yaml) on a GPU without VOC: every key of the preset (ResNet-50,
# output stride 16, 512-px crops, batch 16, CAM scales 1.0/0.5/1.5/2.0 + flip, AMP), on a
# synthetic world of 512-px images instead of PASCAL VOC and with a 20-step budget per training
# stage. It shows that the recipe runs on one GPU (or N: NPROC=N) and what it costs per step;
# it measures no accuracy (random init, 20 steps). CRF and CRF-based stages need pydensecrf.
# Usage: bash benchmarks/voc_preset_smoke.sh [workdir]   (NPROC=2 for two GPUs)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-/tmp/wsss-voc-smoke}
mkdir -p "$work"
cd "$work"
export DVC_ROOT="$work" WSSS_TRACKING=${WSSS_TRACKING:-0} PYTHONUNBUFFERED=1
python3 - "$repo" "${NPROC:-1}" <<'PY'
import sys, yaml
repo, nproc = sys.argv[1], int(sys.argv[2])
raw = yaml.safe_load(open(f"{repo}/params-voc.yaml"))
raw.update(dataset="synth", pretrained="none", seg_init="cls", puzzle_init="cls", sipe_init="cls",
           synth_size=512, synth_n_train=32, synth_n_val=8, synth_n_extra=32, max_steps=20, nproc=nproc,
           methods={"cam": "cls", "gradcam": "cls", "scorecam": "cls", "recam": "recam"})
yaml.safe_dump(raw, open("params.yaml", "w"), sort_keys=False)
PY
run() { local t0=$SECONDS; python3 "$repo/cli.py" "$@" 2>&1 | grep -E '^\[|error' || true; echo "  ($* : $((SECONDS - t0)) s)"; }
run data synth --no-preview
run train-cls
for m in cam gradcam scorecam recam; do run train --method "$m"; run seeds --method "$m"; run eval-seeds --method "$m"; done
run train-seg --method gt
run eval-seg --method gt
