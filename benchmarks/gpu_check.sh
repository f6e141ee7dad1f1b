#!/usr/bin/env bash
# The GPU check: the CUDA tests, then training throughput of seed-92m at 16 x 1024 (bf16 autocast,
# fused AdamW), FANformer against the same-shape Transformer, eager and torch.compile'd.
# About 5 minutes on one H100/H200-class GPU; run it from the repository root:
#
#   bash benchmarks/gpu_check.sh            # uses an installed fanformer, else this checkout
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || status=1
python3 -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())" \
    || exit 1
echo "== CUDA tests"
python3 -m pytest -q -m gpu -p no:cacheprovider tests/fanformer/test_gpu.py tests/quant/test_gpu.py || status=1
echo "== training throughput, eager"
python3 benchmarks/train_throughput.py --steps 30 || status=1
echo "== training throughput, torch.compile"
python3 benchmarks/train_throughput.py --steps 30 --compile || status=1
exit $status
