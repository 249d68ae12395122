#!/usr/bin/env bash
# The GPU checks, run once on a lent H100/H200 machine (which has PyTorch but not nnU-Net):
#   1. the DGST step benchmark on CUDA with AMP (issue: DGST share of a step, peak memory);
#   2. training the bundled demo model (seeded; the committed script, on the GPU for speed).
# Wheels for nnU-Net and its dependencies travel in .whl/ (see the device tool's notes).
set -uo pipefail
OUT=${OUT:-/tmp/device-out}
mkdir -p "$OUT" /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
# nnU-Net's NIfTI reader imports nibabel at import time; these runs read images with SimpleITK only.
mkdir -p /tmp/site/nibabel
echo '"""Import-time stand-in for nibabel (not used by these runs)."""' > /tmp/site/nibabel/__init__.py
printf 'def io_orientation(*args, **kwargs):\n    raise RuntimeError("nibabel is not installed here")\n\naxcodes2ornt = ornt_transform = io_orientation\n' > /tmp/site/nibabel/orientations.py
export PYTHONPATH=/tmp/site:$PWD/LymphNodeDGST PYTHONUNBUFFERED=1
export nnUNet_n_proc_DA=${nnUNet_n_proc_DA:-12} nnUNet_def_n_proc=${nnUNet_def_n_proc:-8}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
echo "== DGST step benchmark (CUDA, AMP)"
timeout 240 python3 Testing/benchmarks/bench_dgst_step.py --device cuda --json "$OUT/bench_dgst_step_cuda.json" 2>&1 | tail -40
echo "== demo model training"
timeout 330 python3 -m LymphNodeDGSTLib.demo.demo_model --output "$OUT/lymphnode-demo.zip" --device cuda \
  --iterations "${DEMO_ITERATIONS:-3000}" --cases 24 2>&1 | tail -45
ls -la "$OUT"
