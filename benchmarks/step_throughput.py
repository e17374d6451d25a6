"""Throughput of one training step of each stage, with the figures that say whether it is good:

  python benchmarks/step_throughput.py --model vit_tiny --batch 64
  python benchmarks/step_throughput.py --model vit_base_mae --batch 64 --device cuda   # bf16

Prints per stage: ms/step, samples/s and FLOP/step (counted by torch's FlopCounterMode); the
self-distillation/MAE step-time ratio beside their FLOP ratio; the saving of the teacher cache
(a self-distillation step with the teacher's targets looked up instead of computed); a plain
timm VisionTransformer forward+backward of the same shape as an in-run anchor (a ratio measured
in the same run, so it means the same on any machine); and on CUDA the MFU against the
device's dense bf16 peak.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from raysd import models
from raysd.losses import distill_loss
from raysd.models import Classifier

# Dense bf16 tensor-core peaks (TFLOP/s) by device name; the MFU line needs the device here.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0,
                    "L4": 121.0, "RTX 4090": 165.0, "RTX 3090": 71.0, "V100": 125.0}


def bench(fn, steps: int, warmup: int, sync) -> float:
    for _ in range(warmup):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return (time.perf_counter() - start) / steps


def flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_tiny", choices=sorted(models.VIT_SPECS))
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
    with torch.no_grad(), torch.autocast(**autocast):
        cached = teacher.represent(batch).float()  # what the teacher cache hands a step

    def step(params, loss_fn):
        opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=1e-4)

        def run():
            with torch.autocast(**autocast):
                loss = loss_fn()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return run

    def mae():
        return student(batch, mask_ratio=0.75)["mae"]

    def sd_live():
        out = student(batch, mask_ratio=0.75, represent=True)
        with torch.no_grad():
            target = teacher.represent(batch)
        return out["mae"] + distill_loss(out["repr"].float(), target.float())

    def sd_cached():
        out = student(batch, mask_ratio=0.75, represent=True)
        return out["mae"] + distill_loss(out["repr"].float(), cached)

    classifier = Classifier(models.build(args.model), 10).to(device)

    def finetune():
        return torch.nn.functional.cross_entropy(classifier(batch).float(), batch["y"])

    import timm  # the anchor: timm's own ViT of the same shape, forward + backward, all patches

    anchor = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10,
                               img_size=spec.img_size, patch_size=spec.patch_size,
                               embed_dim=spec.embed_dim, depth=spec.depth,
                               num_heads=spec.num_heads, mlp_ratio=spec.mlp_ratio).to(device)

    def timm_step():
        return torch.nn.functional.cross_entropy(anchor(batch["x"]).float(), batch["y"])

    stages = {"further_pretrain (MAE)": (student.parameters(), mae),
              "self_distill (live teacher)": (student.parameters(), sd_live),
              "self_distill (teacher cache)": (student.parameters(), sd_cached),
              "finetune (CE, all patches)": (classifier.parameters(), finetune),
              "timm ViT fwd+bwd (anchor)": (anchor.parameters(), timm_step)}
    seconds, counted = {}, {}
    for name, (params, loss_fn) in stages.items():
        run = step(params, loss_fn)
        counted[name] = flops(run)
        seconds[name] = bench(run, args.steps, 3, sync)
    print(f"{args.model} batch {args.batch} on {device} ({'bf16 autocast' if autocast['enabled'] else 'fp32'})")
    for name in stages:
        print(f"  {name:30s} {seconds[name] * 1e3:8.1f} ms/step  {args.batch / seconds[name]:9.1f} "
              f"samples/s  {counted[name] / args.batch / 1e9:7.2f} GFLOP/sample")
    mae_name, live, hit = "further_pretrain (MAE)", "self_distill (live teacher)", "self_distill (teacher cache)"
    print(f"self-distillation / MAE: step time {seconds[live] / seconds[mae_name]:.2f}x, "
          f"FLOP {counted[live] / counted[mae_name]:.2f}x")
    print(f"teacher cache: self-distillation step {seconds[live] / seconds[hit]:.2f}x faster "
          f"({(1 - seconds[hit] / seconds[live]) * 100:.0f}% less time, "
          f"{(1 - counted[hit] / counted[live]) * 100:.0f}% fewer FLOP)")
    anchor_rate = counted["timm ViT fwd+bwd (anchor)"] / seconds["timm ViT fwd+bwd (anchor)"]
    print("achieved FLOP/s against the timm anchor: " + ", ".join(
        f"{name} {counted[name] / seconds[name] / anchor_rate:.2f}" for name in
        (mae_name, live, hit, "finetune (CE, all patches)")))
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
        if peak:
            print(f"MFU on {name} (bf16 peak {peak:.0f} TFLOP/s): " + ", ".join(
                f"{n} {counted[n] / seconds[n] / 1e12 / peak * 100:.1f}%"
                for n in (mae_name, live, hit, "timm ViT fwd+bwd (anchor)")))
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
