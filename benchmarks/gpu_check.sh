#!/usr/bin/env bash
# The prepared GPU check (at most about 8 minutes), for when a GPU machine is lent:
#   1. step throughput of the paper's ViT-B/16 MAE at batch 64 in bf16 (MFU against the peak);
#   2. a 2-trial vit_small study with use_gpu on a generated image folder (no downloads).
# Run from the repository root in an environment with raysd installed: bash benchmarks/gpu_check.sh
set -euo pipefail
out="${OUT:-$(mktemp -d)}"
python - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0),
      "bf16", torch.cuda.is_bf16_supported(), "nccl", torch.cuda.nccl.version())
PY
timeout 240 python benchmarks/step_throughput.py --model vit_base_mae --batch 64 --steps 20 \
  | tee "$out/step_throughput.txt"
python - "$out/images" <<'PY'
import sys
from pathlib import Path
import numpy as np
from PIL import Image
root, rng = Path(sys.argv[1]), np.random.default_rng(0)
for split, n in (("train", 48), ("val", 12), ("test", 12)):
    for c in range(4):  # four classes of coloured noise, separable by their mean colour
        folder = root / split / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = rng.integers(0, 96, (256, 256, 3)) + np.eye(3)[c % 3] * 120 + (c // 3) * 60
            Image.fromarray(img.clip(0, 255).astype("uint8")).save(folder / f"{i}.jpg")
PY
timeout 300 raysd tune --space vit_small --data "imagefolder:$out/images" --set weights=none \
  --num-samples 2 --max-concurrent 1 --set further_pretrain.steps=100 --set self_distill.steps=100 \
  --set finetune.steps=100 --set finetune.warmup_steps=10 --set evaluation.every=50 \
  --set resources.loader_workers=4 --set study.scheduler=none --storage "$out/studies" --name gpu \
  | tee "$out/study.txt"
python - "$out/studies/gpu/results/trials.parquet" <<'PY'
import sys
import pyarrow.parquet as pq
rows = pq.read_table(sys.argv[1]).to_pylist()
for r in rows:
    print({k: r.get(k) for k in ("trial_id", "status", "param.self_distill.rounds", "param.mask_ratio",
                                 "val_accuracy", "trained_seconds", "reused_further_pretrain",
                                 "seconds_further_pretrain", "seconds_finetune")})
PY
