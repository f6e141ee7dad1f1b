#!/usr/bin/env bash
# The GPU check: the CUDA tests, training throughput of seed-92m at 16 x 1024 (bf16 autocast,
# fused AdamW), FANformer against the same-shape Transformer, eager and torch.compile'd, then
# paper-1b's peak training memory at sequence 2048 per memory option set.
# About 7 minutes on one H100/H200-class GPU; run it from the repository root with the package
# installed (pip install -e .):
#
#   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
python3 -c "import fanformer.export" 2>/dev/null || { echo "install the package first: pip install -e ."; exit 1; }
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
echo "== training memory, paper-1b at sequence 2048 (torch.cuda.max_memory_allocated)"
sets="plain checkpoint checkpoint+chunk"
python3 -c "import bitsandbytes" 2>/dev/null && sets="$sets checkpoint+chunk+8bit"
python3 benchmarks/train_memory.py paper-1b --seq-len 2048 --steps 2 --batch-sizes 1 2 --sets $sets || status=1
exit $status
