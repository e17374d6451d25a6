"""Throughput of one training step per stage (MAE, self-distillation, fine-tuning): prints figures.

  python benchmarks/step_throughput.py --model vit_tiny --batch 64
  python benchmarks/step_throughput.py --model vit_base_mae --batch 64 --device cuda   # bf16 autocast
"""
from __future__ import annotations

import argparse
import time

import torch

from raysd import models
from raysd.losses import distill_loss
from raysd.models import Classifier


def bench(fn, steps: int, warmup: int, sync) -> float:
    for _ in range(warmup):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="vit_tiny")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    spec = models.VIT_SPECS[args.model]
    batch = {"x": torch.randn(args.batch, 3, spec.img_size, spec.img_size, device=device),
             "y": torch.randint(0, 10, (args.batch,), device=device)}
    student = models.build(args.model).to(device)
    teacher = models.build(args.model).to(device).eval().requires_grad_(False)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-4)

    def step(loss_fn):
        def run():
            with torch.autocast(**autocast):
                loss = loss_fn()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return run

    def mae():
        return student(batch, mask_ratio=0.75)["mae"]

    def sd():
        out = student(batch, mask_ratio=0.75, represent=True)
        with torch.no_grad():
            target = teacher.represent(batch)
        return out["mae"] + distill_loss(out["repr"].float(), target.float())

    results = {"further_pretrain (MAE)": bench(step(mae), args.steps, 3, sync),
               "self_distill (MAE + distill)": bench(step(sd), args.steps, 3, sync)}
    classifier = Classifier(student, 10).to(device)
    opt = torch.optim.AdamW(classifier.parameters(), lr=1e-4)
    results["finetune (CE, all patches)"] = bench(
        step(lambda: torch.nn.functional.cross_entropy(classifier(batch).float(), batch["y"])),
        args.steps, 3, sync)
    print(f"{args.model} batch {args.batch} on {device} ({'bf16 autocast' if autocast['enabled'] else 'fp32'})")
    for name, seconds in results.items():
        print(f"  {name:30s} {seconds * 1000:8.1f} ms/step  {args.batch / seconds:9.1f} samples/s")
    if device.type == "cuda":
        print(f"  peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
