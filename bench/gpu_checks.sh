#!/usr/bin/env bash
# GPU checks in one short run (what a lent GPU is used for; everything else runs and is tested on CPU):
#   1. CSR training on CUDA with bf16 AMP at the paper's ImageNet shape (d 2048, hidden 8192, batch 4096)
#   2. a torchrun launch (DDP, NCCL) of the same trainer
#   3. retrieval time, protocol T, torch sparse CSR path vs dense torch matmul (1.3M database, 512-query batches)
#   4. multimodal training throughput on fixture shards (open_clip ViT-B-16, random init): fp32 vs AMP vs cache
#   5. embedding extraction with AMP (EfficientNet-Lite0, real weights) on a small ImageFolder
#
#   bash bench/gpu_checks.sh OUT_DIR MM_FIXTURES IMAGE_FOLDER
set -uo pipefail
OUT=${1:-results/gpu}; MM=${2:-.cache/mm_gpu}; IMAGES=${3:-.cache/fmnist/images}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

W=/tmp/csr_gpu; mkdir -p $W
$PY - <<'EOF'
import numpy as np
rng = np.random.default_rng(0)
n, d = 131072, 2048
basis = rng.normal(size=(64, d)).astype(np.float32)
x = np.maximum(rng.normal(size=(n, 64)).astype(np.float32) @ basis + rng.normal(size=(n, d)).astype(np.float32) * 0.3, 0)
np.save("/tmp/csr_gpu/train_emb.npy", x); np.save("/tmp/csr_gpu/train_labels.npy", rng.integers(0, 1000, n))
print("synthetic ImageNet-shaped embeddings", x.shape)
EOF

echo "== 1. CSR training, CUDA + bf16 AMP"
$PY main_visual.py --pretrained_emb $W/train_emb.npy --topk 8 --hidden-size 8192 --epochs 2 --out $W/run \
    --device cuda 2>&1 | grep -v "^model\|^train:" | tail -6
echo "== 2. torchrun --nproc_per_node=1, DDP over NCCL"
$PY -m torch.distributed.run --standalone --nproc_per_node=1 main_visual.py --pretrained_emb $W/train_emb.npy \
    --topk 8 --hidden-size 8192 --epochs 1 --use_ddp True --out $W/ddp 2>&1 | tail -3
echo "== 3. retrieval time on GPU (torch sparse CSR vs dense matmul)"
$PY retrieval/retrieval_time.py --backend torch --k 8 32 128 --dense-dims 32 128 512 2048 \
    --warmup-rounds 5 --rounds 30 --max-seconds 10 --out "$OUT/retrieval_time_gpu.json" --overwrite 2>&1 | tail -25
echo "== 4. multimodal training throughput"
$PY bench/multimodal_throughput.py --fixtures "$MM" --model ViT-B-16 --workers 8 2>&1 | tail -8
echo "== 5. embedding extraction with AMP"
$PY inference/pretrained_embeddings.py --train_dir "$IMAGES/train" --eval_dir "$IMAGES/val" \
    --model_name tf_efficientnet_lite0 --weights efficientnet-lite0 --img-size 224 --batch-size 256 --workers 8 \
    --out $W/emb --overwrite 2>&1 | tail -4
