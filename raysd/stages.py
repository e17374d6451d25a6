"""The paper's stages, one public function each, free of Ray:

  further_pretrain       theta_init -> theta_0 by masked auto-encoding on D_u          (Alg. 2)
  self_distill_round     the student restarts from theta_init and minimises
                         lambda * L_MAE + ||f_student(x) - StopGrad(f_teacher(x))||^2   (Alg. 1)
                         (or an ablation's target: objectives.py)
  finetune_and_evaluate  encoder + fresh linear head, cross-entropy on D_tr (plus a baseline's
                         regulariser: objectives.py); val/test metrics
  knn_signal             a cheap score of a pre-training stage's representation (early signal)

They share one loop (`train_loop`): AdamW, warm-up + linear decay, a NaN guard, step-seeded
randomness, reports and mid-stage checkpoints through the caller's Hooks.
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
from torch.utils.data import Dataset

from raysd.artifacts import ArtifactStore
from raysd.config import StageConfig, TrialConfig
from raysd.data import Task
from raysd.data.loader import shard_batches, step_batches
from raysd.features import autocast, represent_all, sample_indices, unwrap
from raysd.models import Classifier
from raysd.objectives import distill_step, finetune_step


class NonFiniteLoss(RuntimeError):
    """Training diverged; the trial is recorded as failed with this message."""


def _identity(x):
    return x


@dataclasses.dataclass
class Hooks:
    """What the caller (Ray Train, a test, the demo's bootstrap) lends the method."""

    device: torch.device = torch.device("cpu")
    rank: int = 0
    world_size: int = 1
    wrap: Callable[[nn.Module], nn.Module] = _identity  # DDP in Ray Train, identity alone
    all_reduce: Callable[[torch.Tensor], torch.Tensor] = _identity  # in-place sum over ranks
    report: Callable[[dict, dict | None], None] = lambda metrics, state: None
    resume: dict | None = None  # a state previously passed to report()
    autocast: torch.dtype | None = None  # torch.bfloat16 on GPUs
    artifacts: ArtifactStore | None = None  # where stage outputs are shared; None: no reuse
    # Called by rank 0 with the fine-tuned Classifier and its final metrics, before the trial's
    # last report; None: the model is not kept.
    save_model: Callable[[nn.Module, dict], None] | None = None


@dataclasses.dataclass
class MidStage:
    """A stage stopped mid-way: everything needed to continue it exactly."""

    step: int
    model: dict
    optimizer: dict
    scheduler: dict


@dataclasses.dataclass
class StageRun:
    """One stage of one trial: its place in the trial, how to report, where to resume."""

    cfg: TrialConfig
    hooks: Hooks
    stage: str
    round: int
    offset: int = 0  # steps of the trial's earlier stages, so a row's `progress` is its trial-wide step
    resume: MidStage | None = None
    checkpoint: Callable[[MidStage], dict] | None = None  # -> the state report() saves

    def row(self, step: int) -> dict:
        return {"stage": self.stage, "round": self.round, "step": step, "progress": self.offset + step}

    def seed(self, *parts) -> int:
        return _seed(self.cfg.seed, self.stage, self.round, *parts)


def weights_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in unwrap(model).state_dict().items()}


def further_pretrain(init: nn.Module, d_u: Dataset, run: StageRun) -> tuple[dict, dict]:
    """theta_0: masked auto-encoding on D_u from (theta_init, phi_init). -> (weights, last row)"""
    model = run.hooks.wrap(copy.deepcopy(init).to(run.hooks.device))
    gamma = run.cfg.mask_ratio

    def step_loss(batch: dict) -> tuple[torch.Tensor, dict]:
        mae = model(batch, mask_ratio=gamma)["mae"]
        return mae, {"mae_loss": mae}

    last = train_loop(model, step_loss, run.cfg.further_pretrain, d_u, run)
    return weights_of(model), last


def self_distill_round(init: nn.Module, teacher_weights: dict, d_u: Dataset, run: StageRun
                       ) -> tuple[dict, dict]:
    """theta_t: the student restarts from (theta_init, phi_init); the teacher theta_{t-1} is
    frozen. What the student matches is self_distill.target (objectives.distill_step).
    -> (weights, last row)"""
    cfg, hooks = run.cfg, run.hooks
    distill = cfg.self_distill
    uses_decoder = distill.target == "predictions"  # the teacher's reconstructions are the target
    teacher = copy.deepcopy(init)
    teacher.load_state_dict(teacher_weights)
    if not uses_decoder:
        teacher.decoder = None
    teacher.to(hooks.device).eval().requires_grad_(False)
    student = copy.deepcopy(init)
    if distill.mae_weight == 0 and not uses_decoder:
        # lambda = 0: the decoder takes no part, so it must not move (not even by weight decay).
        student.decoder.requires_grad_(False)
    model = hooks.wrap(student.to(hooks.device))
    # The teacher is frozen and sees un-augmented D_u: f_teacher(x_i) is one vector per example
    # for the whole round, computed once when the round takes more samples than D_u holds.
    step_loss, dataset = distill_step(model, teacher, d_u, run)
    last = train_loop(model, step_loss, distill, dataset, run)
    return weights_of(model), last


def finetune_and_evaluate(init: nn.Module, weights: dict, task: Task, run: StageRun
                          ) -> tuple[dict, dict, Classifier]:
    """Drop the decoder, add a linear head, fine-tune with cross-entropy, evaluate.

    Returns the last training row, the final metrics (val, test, train, gen_gap) and the
    fine-tuned Classifier (unwrapped from DDP)."""
    cfg, hooks = run.cfg, run.hooks
    backbone = copy.deepcopy(init)
    backbone.load_state_dict(weights)
    classifier = Classifier(backbone, task.num_classes)
    # Every encoder tensor trains, position embeddings too (fixed sin-cos while pre-training a
    # ViT): the reference fine-tunes a ViTForImageClassification, whose are parameters.
    classifier.backbone.encoder.requires_grad_(True)
    set_hidden_dropout(classifier.backbone, cfg.finetune.dropout)
    torch.manual_seed(_seed(cfg.seed, "head"))  # same head init on every rank and every retry
    classifier.init_head()
    model = hooks.wrap(classifier.to(hooks.device))
    step_loss, make_optimizer, after_step = finetune_step(model, weights, run)

    def validate() -> dict:
        return {f"val_{k}": v for k, v in evaluate(unwrap(model), task.val, task, cfg, hooks).items()}

    last = train_loop(model, step_loss, cfg.finetune, task.train, run, validate=validate,
                      make_optimizer=make_optimizer, after_step=after_step)
    final = unwrap(model)
    metrics = {}
    for split, dataset in (("val", task.val), ("test", task.test), ("train", task.unlabelled)):
        metrics.update({f"{split}_{k}": v for k, v in evaluate(final, dataset, task, cfg, hooks).items()})
    metrics["gen_gap"] = metrics["test_loss"] - metrics["train_loss"]  # the paper's Figure 5
    metrics["init_distance"] = _distance(final.backbone.encoder, init.state_dict())
    return last, metrics, final


def _distance(encoder: nn.Module, init_state: dict) -> float:
    """||theta_init - theta_final||_2 over the encoder's parameters."""
    total = 0.0
    for name, param in encoder.named_parameters():
        ref = init_state[f"encoder.{name}"].to(param.device)
        total += float((param.detach().float() - ref.float()).pow(2).sum())
    return math.sqrt(total)


# Fine-tuning exempts parameters whose names hold these, as the reference's fine-tuning does
# ("bias", "position_embeddings", "cls_token"; norm weights are decayed), in both families' names.
FINETUNE_NO_DECAY = ("bias", "pos_embed", "position_embeddings", "cls_token")


def _param_groups(model: nn.Module, weight_decay: float, stage: str) -> list[dict]:
    """AdamW groups. Pre-training stages exempt 1-D tensors and biases (timm's add_weight_decay,
    the reference's); fine-tuning exempts FINETUNE_NO_DECAY by name (the reference's)."""
    decay, free = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if stage == "finetune":
            skip = any(part in name for part in FINETUNE_NO_DECAY)
        else:
            skip = param.ndim <= 1 or name.endswith(".bias")
        (free if skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": free, "weight_decay": 0.0}]


# The reference's hidden_dropout_prob sits at the embeddings, the attention output and the MLP
# output: timm's pos_drop, attn.proj_drop and mlp.drop2 (not drop1, after the GELU);
# transformers' embeddings.dropout and each layer's attention.output / output dropout.
HIDDEN_DROPOUT = ("pos_drop", "proj_drop", "drop2", "embeddings.dropout", "output.dropout")


def set_hidden_dropout(backbone: nn.Module, p: float) -> None:
    """Dropout p at HIDDEN_DROPOUT while fine-tuning; every other dropout is left as it is."""
    for name, module in backbone.encoder.named_modules():
        if isinstance(module, nn.Dropout) and name.endswith(HIDDEN_DROPOUT):
            module.p = p


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def _lr_lambda(scfg: StageConfig) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < scfg.warmup_steps:
            return (step + 1) / scfg.warmup_steps
        rest = max(1, scfg.steps - scfg.warmup_steps)
        return max(0.0, 1.0 - (step - scfg.warmup_steps) / rest)
    return factor


def _adamw(groups: list[dict], lr: float, betas: tuple[float, float]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def train_loop(model: nn.Module, step_loss, scfg: StageConfig, dataset: Dataset, run: StageRun,
               validate: Callable[[], dict] | None = None, make_optimizer: Callable | None = None,
               after_step: Callable[[], None] | None = None) -> dict:
    """The stage loop: AdamW (or `make_optimizer(groups, lr, betas)`), warm-up + linear decay,
    optional clipping, `after_step` (a projection) after every step, NaN guard, reports.

    Reports every log_every steps; the last row is returned for the caller to report with
    the stage's boundary checkpoint (or the trial's final metrics)."""
    cfg, hooks = run.cfg, run.hooks
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = (make_optimizer or _adamw)(_param_groups(unwrap(model), scfg.weight_decay, run.stage),
                                           scfg.lr, (0.9, scfg.beta2))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(scfg))
    start = 0
    if run.resume is not None:
        unwrap(model).load_state_dict(run.resume.model)
        optimizer.load_state_dict(run.resume.optimizer)
        scheduler.load_state_dict(run.resume.scheduler)
        start = run.resume.step
    per_rank = max(1, scfg.batch_size // hooks.world_size)
    batches = step_batches(dataset, per_rank, seed=run.seed(), start=start, stop=scfg.steps,
                           rank=hooks.rank, world=hooks.world_size, workers=cfg.resources.loader_workers)
    model.train()
    window_start, window_samples = time.perf_counter(), 0
    for step, batch in enumerate(batches, start=start):
        # Per-step seeding makes masks and dropout a function of (seed, stage, round, step, rank):
        # a resumed stage replays exactly what an uninterrupted one would have drawn.
        torch.manual_seed(run.seed(step, hooks.rank))
        batch = {k: v.to(hooks.device, non_blocking=True) for k, v in batch.items()}
        with autocast(hooks):
            loss, parts = step_loss(batch)
        # A sync point per step, the price of catching divergence at once. The check is summed
        # over ranks, so every rank stops at the same step and none is left in an all-reduce.
        value = loss.item()
        summed = float(hooks.all_reduce(loss.detach().float().reshape(1).clone()))
        if not math.isfinite(summed):
            raise NonFiniteLoss(f"{run.stage} round {run.round} step {step}: loss is {summed}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if scfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, scfg.grad_clip)
        optimizer.step()
        if after_step is not None:
            after_step()
        scheduler.step()
        window_samples += len(batch[next(iter(batch))]) * hooks.world_size
        steps_done = step + 1
        if steps_done % cfg.logging.log_every == 0 or steps_done == scfg.steps:
            elapsed = time.perf_counter() - window_start
            metrics = {**run.row(steps_done), "loss": value,
                       **{k: float(v.detach()) for k, v in parts.items()},
                       "lr": scheduler.get_last_lr()[0], "samples_per_s": window_samples / elapsed}
            if validate is not None and cfg.evaluation.every and (steps_done % cfg.evaluation.every == 0 or steps_done == scfg.steps):
                metrics.update(validate())
                model.train()
            if steps_done == scfg.steps:
                return metrics
            state = None
            if steps_done % cfg.logging.checkpoint_every == 0 and run.checkpoint is not None:
                state = run.checkpoint(MidStage(steps_done, unwrap(model).state_dict(),
                                                     optimizer.state_dict(), scheduler.state_dict()))
            hooks.report(metrics, state)
            window_start, window_samples = time.perf_counter(), 0
    return metrics


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, task: Task, cfg: TrialConfig, hooks: Hooks) -> dict:
    """Loss and metrics over the whole split: each rank takes a shard, counts are summed."""
    was_training = model.training
    model.eval()
    c = task.num_classes
    confusion = torch.zeros(c * c, dtype=torch.float64, device=hooks.device)
    loss_sum = torch.zeros(1, dtype=torch.float64, device=hooks.device)
    for batch in shard_batches(dataset, cfg.evaluation.batch_size, hooks.rank, hooks.world_size,
                               cfg.resources.loader_workers, cfg.evaluation.max_examples):
        batch = {k: v.to(hooks.device) for k, v in batch.items()}
        with autocast(hooks):
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
    if total == 0:  # an empty split (evaluation.val_fraction 0 without val/): nothing to measure
        return {k: math.nan for k in ("loss", *names)}
    tp = confusion.diag()
    out = {"loss": loss_sum / total, "accuracy": float(tp.sum()) / total}
    if "macro_f1" in names or "micro_f1" in names:
        support, predicted = confusion.sum(1), confusion.sum(0)
        f1 = 2 * tp / (support + predicted).clamp(min=1)
        present = (support + predicted) > 0  # sklearn averages over labels seen in y or y_pred
        out["macro_f1"] = float(f1[present].mean())
        out["micro_f1"] = out["accuracy"]  # single-label multi-class: micro-F1 == accuracy
    return {k: v for k, v in out.items() if k == "loss" or k in names}


@torch.no_grad()
def knn_signal(model: nn.Module, task: Task, run: StageRun, k: int = 20,
               temperature: float = 0.07) -> dict:
    """The early signal of a pre-training stage: weighted k-NN accuracy of val's f(x) against
    D_u's labelled f(x) under cosine similarity (DINO's protocol), on a fixed random subset of
    `signal_examples` of each. No training, one pass."""
    cfg, hooks = run.cfg, run.hooks
    was_training = model.training
    model.eval()
    bank, bank_y = represent_all(model, task.unlabelled, cfg, hooks,
                                 sample_indices(len(task.unlabelled), cfg.evaluation.signal_examples))
    query, query_y = represent_all(model, task.val, cfg, hooks,
                                   sample_indices(len(task.val), cfg.evaluation.signal_examples))
    model.train(was_training)
    sims = F.normalize(query, dim=1) @ F.normalize(bank, dim=1).T  # [Q, N]
    top, index = sims.topk(min(k, len(bank)), dim=1)  # [Q, k]
    votes = torch.zeros(len(query), task.num_classes, device=sims.device)
    votes.scatter_add_(1, bank_y[index], (top / temperature).exp())
    return {"knn_accuracy": float((votes.argmax(1) == query_y).float().mean())}
