"""THE METHOD (Lee et al., ICLR 2023), free of Ray: one trial, read top to bottom.

  further pre-training     theta_init -> theta_0 by masked auto-encoding on D_u   (Alg. 2)
  self-distillation t=1..T' student restarts from theta_init and minimises
                           lambda * L_MAE + ||f_student(x) - StopGrad(f_teacher(x))||^2  (Alg. 1)
  fine-tuning              encoder + fresh linear head, cross-entropy on D_tr
  evaluation               validation and test metrics, all ranks' shards together

The caller passes Hooks: the device, DDP wrapping, an all-reduce, a `report(metrics,
state)` callback (called by every rank at the same steps) and a state to resume from.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
import zlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from raysd.config import StageConfig, TrialConfig
from raysd.data import Task
from raysd.data.loader import shard_batches, step_batches
from raysd.losses import distill_loss
from raysd.models import Classifier


class NonFiniteLoss(RuntimeError):
    """Training diverged; the trial is recorded as failed with this message."""


def _identity(x):
    return x


@dataclasses.dataclass
class Hooks:
    device: torch.device = torch.device("cpu")
    rank: int = 0
    world_size: int = 1
    wrap: Callable[[nn.Module], nn.Module] = _identity  # DDP in Ray Train, identity alone
    all_reduce: Callable[[torch.Tensor], torch.Tensor] = _identity  # in-place sum over ranks
    report: Callable[[dict, dict | None], None] = lambda metrics, state: None
    resume: dict | None = None  # a state previously passed to report()
    autocast: torch.dtype | None = None  # torch.bfloat16 on GPUs


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def run_trial(cfg: TrialConfig, task: Task, init: nn.Module, hooks: Hooks) -> dict:
    """Run every stage of cfg.method from theta_init (`init`); return the final metrics."""
    init_state = copy.deepcopy(init.state_dict())  # (theta_init, phi_init), restored every round
    plan = cfg.stages()
    resume = hooks.resume or {}
    position = resume.get("position", 0)
    carry = resume.get("carry")  # output of the last finished stage: teacher or fine-tune start
    summary: dict = resume.get("summary", {})
    if hooks.resume is not None:  # a restarted worker group: say where it picked up
        stage, rnd = plan[position]
        summary["restarts"] = summary.get("restarts", 0) + 1
        summary["resumed_from"] = f"{stage} round {rnd} step {resume.get('step', 0)}"

    for index in range(position, len(plan)):
        stage, rnd = plan[index]
        mid = resume if resume.get("position") == index and resume.get("step", 0) > 0 else None
        started = time.perf_counter()
        ctx = _StageContext(cfg, hooks, plan, index, carry, summary)
        if stage == "finetune":
            last, final = finetune_and_evaluate(cfg, task, init, init_state, carry, ctx, mid)
            summary.update(final)
        else:
            last, carry = pretrain_stage(cfg, task, init, init_state, carry, ctx, mid)
        name = stage if stage != "self_distill" else f"self_distill_{rnd}"
        summary[f"seconds_{name}"] = summary.get(f"seconds_{name}", 0.0) + time.perf_counter() - started
        summary[f"steps_{name}"] = _stage_cfg(cfg, stage).steps
        if index + 1 < len(plan):
            # Stage boundary: checkpoint so a restart never repeats a finished stage.
            hooks.report(last, {"position": index + 1, "step": 0, "carry": carry, "summary": summary})
    hooks.report({**last, **summary, "trial_done": True}, None)
    return summary


def _stage_cfg(cfg: TrialConfig, stage: str) -> StageConfig:
    return getattr(cfg, stage)


@dataclasses.dataclass
class _StageContext:
    cfg: TrialConfig
    hooks: Hooks
    plan: list
    index: int
    carry: dict | None
    summary: dict

    def progress(self, stage: str, rnd: int, step: int) -> dict:
        """Row identity: stage, round, step and a trial-wide step counter for schedulers."""
        before = sum(_stage_cfg(self.cfg, s).steps for s, _ in self.plan[: self.index])
        return {"stage": stage, "round": rnd, "step": step, "progress": before + step}

    def state(self, step: int, model: nn.Module, opt, sched) -> dict:
        return {"position": self.index, "step": step, "carry": self.carry, "summary": self.summary,
                "model": unwrap(model).state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict()}


def pretrain_stage(cfg: TrialConfig, task: Task, init: nn.Module, init_state: dict,
                   teacher_state: dict | None, ctx: _StageContext, mid: dict | None
                   ) -> tuple[dict, dict]:
    """Further pre-training (round 0) or self-distillation round t.

    Returns the last training row and the new weights (the next teacher)."""
    stage, rnd = ctx.plan[ctx.index]
    hooks = ctx.hooks
    student = copy.deepcopy(init)
    student.load_state_dict(init_state)  # every round restarts from (theta_init, phi_init)
    teacher = None
    use_mae = stage == "further_pretrain" or cfg.mae_weight > 0
    if stage == "self_distill":
        teacher = copy.deepcopy(init)
        teacher.load_state_dict(teacher_state)  # theta_{t-1}
        teacher.decoder = None
        teacher.to(hooks.device).eval().requires_grad_(False)
    if not use_mae:
        # lambda = 0: the decoder takes no part, so it must not move (not even by weight decay).
        student.decoder.requires_grad_(False)
    model = hooks.wrap(student.to(hooks.device))
    mask_ratio = cfg.mask_ratio if use_mae else None

    def step_loss(batch: dict) -> tuple[torch.Tensor, dict]:
        out = model(batch, mask_ratio=mask_ratio, represent=teacher is not None)
        if teacher is None:
            return out["mae"], {"mae_loss": out["mae"]}
        with torch.no_grad():
            target = teacher.represent(batch)
        distill = distill_loss(out["repr"].float(), target.float())
        if not use_mae:
            return distill, {"distill_loss": distill}
        loss = cfg.mae_weight * out["mae"] + distill
        return loss, {"mae_loss": out["mae"], "distill_loss": distill}

    last = _train(model, step_loss, _stage_cfg(cfg, stage), task.unlabelled, ctx, mid)
    return last, {k: v.detach().cpu().clone() for k, v in unwrap(model).state_dict().items()}


def finetune_and_evaluate(cfg: TrialConfig, task: Task, init: nn.Module, init_state: dict,
                          start_state: dict | None, ctx: _StageContext, mid: dict | None
                          ) -> tuple[dict, dict]:
    """Drop the decoder, add a linear head, fine-tune with cross-entropy, evaluate.

    Returns the last training row and the final metrics."""
    hooks = ctx.hooks
    backbone = copy.deepcopy(init)
    backbone.load_state_dict(start_state if start_state is not None else init_state)
    classifier = Classifier(backbone, task.num_classes)
    torch.manual_seed(_seed(cfg.seed, "head"))  # same head init on every rank and every retry
    classifier.head.reset_parameters()
    model = hooks.wrap(classifier.to(hooks.device))

    def step_loss(batch: dict) -> tuple[torch.Tensor, dict]:
        loss = F.cross_entropy(model(batch).float(), batch["y"])
        return loss, {"ce_loss": loss}

    def validate(step: int) -> dict:
        return {f"val_{k}": v for k, v in evaluate(unwrap(model), task.val, task, cfg, hooks).items()}

    last = _train(model, step_loss, cfg.finetune, task.train, ctx, mid, validate=validate)
    final = unwrap(model)
    metrics = {}
    for split in ("val", "test", "train"):
        dataset = {"val": task.val, "test": task.test, "train": task.unlabelled}[split]
        metrics.update({f"{split}_{k}": v for k, v in evaluate(final, dataset, task, cfg, hooks).items()})
    metrics["gen_gap"] = metrics["test_loss"] - metrics["train_loss"]  # the paper's Figure 5
    metrics["init_distance"] = _distance(final.backbone.encoder, init_state)
    return last, metrics


def _distance(encoder: nn.Module, init_state: dict) -> float:
    """||theta_init - theta_final||_2 over the encoder's parameters."""
    total = 0.0
    for name, param in encoder.named_parameters():
        ref = init_state[f"encoder.{name}"].to(param.device)
        total += float((param.detach().float() - ref.float()).pow(2).sum())
    return math.sqrt(total)


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def _lr_lambda(scfg: StageConfig) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < scfg.warmup_steps:
            return (step + 1) / scfg.warmup_steps
        rest = max(1, scfg.steps - scfg.warmup_steps)
        return max(0.0, 1.0 - (step - scfg.warmup_steps) / rest)
    return factor


def _train(model: nn.Module, step_loss, scfg: StageConfig, dataset, ctx: _StageContext,
           mid: dict | None, validate: Callable[[int], dict] | None = None) -> dict:
    """The stage loop: AdamW, warm-up + linear decay, optional clipping, NaN guard, reports.

    Reports every log_every steps; the last row is returned for the caller to report with
    the stage's boundary checkpoint (or the trial's final metrics)."""
    cfg, hooks = ctx.cfg, ctx.hooks
    stage, rnd = ctx.plan[ctx.index]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=scfg.lr, betas=(0.9, scfg.beta2),
                                  weight_decay=scfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(scfg))
    start = 0
    if mid is not None:
        unwrap(model).load_state_dict(mid["model"])
        optimizer.load_state_dict(mid["optimizer"])
        scheduler.load_state_dict(mid["scheduler"])
        start = mid["step"]
    per_rank = max(1, scfg.batch_size // hooks.world_size)
    batches = step_batches(dataset, per_rank, seed=_seed(cfg.seed, stage, rnd), start=start,
                           stop=scfg.steps, rank=hooks.rank, world=hooks.world_size,
                           workers=cfg.loader_workers)
    model.train()
    window_start, window_samples = time.perf_counter(), 0
    for step, batch in enumerate(batches, start=start):
        # Per-step seeding makes masks and dropout a function of (seed, stage, round, step, rank):
        # a resumed stage replays exactly what an uninterrupted one would have drawn.
        torch.manual_seed(_seed(cfg.seed, stage, rnd, step, hooks.rank))
        batch = {k: v.to(hooks.device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(hooks.device.type, dtype=hooks.autocast or torch.bfloat16,
                            enabled=hooks.autocast is not None):
            loss, parts = step_loss(batch)
        # A sync point per step, the price of catching divergence at once. The check is summed
        # over ranks, so every rank stops at the same step and none is left in an all-reduce.
        value = loss.item()
        summed = float(hooks.all_reduce(loss.detach().float().reshape(1).clone()))
        if not math.isfinite(summed):
            raise NonFiniteLoss(f"{stage} round {rnd} step {step}: loss is {summed}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if scfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, scfg.grad_clip)
        optimizer.step()
        scheduler.step()
        window_samples += len(batch[next(iter(batch))]) * hooks.world_size
        steps_done = step + 1
        if steps_done % cfg.log_every == 0 or steps_done == scfg.steps:
            elapsed = time.perf_counter() - window_start
            metrics = {**ctx.progress(stage, rnd, steps_done), "loss": value,
                       **{k: float(v.detach()) for k, v in parts.items()},
                       "lr": scheduler.get_last_lr()[0], "samples_per_s": window_samples / elapsed}
            if validate is not None and cfg.eval_every and (steps_done % cfg.eval_every == 0 or steps_done == scfg.steps):
                metrics.update(validate(steps_done))
                model.train()
            if steps_done == scfg.steps:
                return metrics
            due = steps_done % cfg.checkpoint_every == 0
            hooks.report(metrics, ctx.state(steps_done, model, optimizer, scheduler) if due else None)
            window_start, window_samples = time.perf_counter(), 0
    return metrics


@torch.no_grad()
def evaluate(model: nn.Module, dataset, task: Task, cfg: TrialConfig, hooks: Hooks) -> dict:
    """Loss and metrics over the whole split: each rank takes a shard, counts are summed."""
    was_training = model.training
    model.eval()
    c = task.num_classes
    confusion = torch.zeros(c * c, dtype=torch.float64, device=hooks.device)
    loss_sum = torch.zeros(1, dtype=torch.float64, device=hooks.device)
    for batch in shard_batches(dataset, cfg.eval_batch_size, hooks.rank, hooks.world_size,
                               cfg.loader_workers, cfg.eval_max_examples):
        batch = {k: v.to(hooks.device) for k, v in batch.items()}
        with torch.autocast(hooks.device.type, dtype=hooks.autocast or torch.bfloat16,
                            enabled=hooks.autocast is not None):
            logits = model(batch).float()
        loss_sum += F.cross_entropy(logits, batch["y"], reduction="sum").double()
        confusion += torch.bincount(batch["y"] * c + logits.argmax(-1), minlength=c * c).double()
    hooks.all_reduce(confusion)
    hooks.all_reduce(loss_sum)
    model.train(was_training)
    return metrics_from_confusion(confusion.view(c, c).cpu(), float(loss_sum), task.metrics)


def metrics_from_confusion(confusion: torch.Tensor, loss_sum: float, names: tuple[str, ...]) -> dict:
    """confusion[true, predicted] -> loss, accuracy, macro-F1 and micro-F1 as asked."""
    total = float(confusion.sum())
    tp = confusion.diag()
    out = {"loss": loss_sum / total, "accuracy": float(tp.sum()) / total}
    if "macro_f1" in names or "micro_f1" in names:
        support, predicted = confusion.sum(1), confusion.sum(0)
        f1 = 2 * tp / (support + predicted).clamp(min=1)
        present = (support + predicted) > 0  # sklearn averages over labels seen in y or y_pred
        out["macro_f1"] = float(f1[present].mean())
        out["micro_f1"] = out["accuracy"]  # single-label multi-class: micro-F1 == accuracy
    return {k: v for k, v in out.items() if k == "loss" or k in names}
