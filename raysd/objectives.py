"""What a stage minimises, chosen by its settings, free of Ray: a self-distillation round's
target (self_distill.target) and fine-tuning's regulariser (finetune.regulariser).

Each builder returns what stages.train_loop takes: step_loss(batch) -> (loss, parts), and for
the regularisers an optimizer factory and an after-step projection.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from raysd.features import unwrap
from raysd.losses import distill_loss
from raysd.regularisers import (RecAdam, embedding_noise, l2_distance, layer_weights, mars_distance,
                                mars_project, symmetric_kl)
from raysd.teacher import teacher_targets

StepLoss = Callable[[dict], tuple[torch.Tensor, dict]]


def _total(lam: float, mae: torch.Tensor | None, match: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """lambda * L_MAE + L_match; the decoder's loss only where lambda > 0."""
    if lam == 0:
        return match, {"distill_loss": match}
    return lam * mae + match, {"mae_loss": mae, "distill_loss": match}


def distill_step(model: nn.Module, teacher: nn.Module, d_u: Dataset, run) -> tuple[StepLoss, Dataset]:
    """The round's step loss and the dataset it reads, by self_distill.target:
    representation  lambda * L_MAE + ||f(x) - f_teacher(x)||^2            (the paper's)
    predictions     lambda * L_MAE + distance of g(f(x^)) to g_t(f_t(x^)) on one masked input
    weights_*       lambda * L_MAE + L2 / MARS distance of the encoder to the teacher's"""
    cfg, hooks = run.cfg, run.hooks
    distill = cfg.self_distill
    lam, gamma, student = distill.mae_weight, cfg.mask_ratio, unwrap(model)
    if distill.target == "representation":
        targets = teacher_targets(teacher, d_u, cfg, hooks, samples=distill.steps * distill.batch_size)

        def represent(batch: dict) -> tuple[torch.Tensor, dict]:
            out = model(batch, mask_ratio=gamma if lam > 0 else None, represent=True)
            return _total(lam, out.get("mae"), distill_loss(out["repr"].float(), targets(batch).float()))
        return represent, targets.dataset
    if distill.target == "predictions":
        def predict(batch: dict) -> tuple[torch.Tensor, dict]:
            masking = student.draw_masking(batch, gamma)  # one mask for student and teacher
            pred = model(batch, masking=masking)["pred"]
            with torch.no_grad():
                target = teacher.predict(batch, masking)
            match = student.prediction_distance(pred.float(), target.float(), masking)
            mae = student.reconstruction_loss(pred, batch, masking) if lam > 0 else None
            return _total(lam, mae, match)
        return predict, d_u
    distance = l2_distance if distill.target == "weights_l2" else mars_distance
    anchor = {k: v.to(hooks.device) for k, v in teacher.encoder.state_dict().items()}

    def weights(batch: dict) -> tuple[torch.Tensor, dict]:
        # The forward runs even at lambda = 0 (its loss then weighs nothing), so DDP sees one.
        mae = model(batch, mask_ratio=gamma)["mae"]
        match = distance(student.encoder, anchor)
        return _total(lam, mae, match) if lam > 0 else (match + 0 * mae, {"distill_loss": match})
    return weights, d_u


def finetune_step(model: nn.Module, start: dict[str, torch.Tensor], run
                  ) -> tuple[StepLoss, Callable | None, Callable[[], None] | None]:
    """(step loss, optimizer factory or None for AdamW, after-step or None) of fine-tuning
    under finetune.regulariser; `start` is the backbone's state fine-tuning starts from."""
    cfg = run.cfg
    kind = cfg.finetune.regulariser
    classifier = unwrap(model)

    def cross_entropy(batch: dict) -> tuple[torch.Tensor, dict]:
        loss = F.cross_entropy(model(batch).float(), batch["y"])
        return loss, {"ce_loss": loss}

    if kind == "r3f":
        perturb = embedding_noise(cfg.r3f.noise, cfg.r3f.eps)

        def r3f(batch: dict) -> tuple[torch.Tensor, dict]:
            clean, noised = model(batch, perturb=perturb).float().chunk(2)  # one forward, [2B, C]
            ce, kl = F.cross_entropy(clean, batch["y"]), symmetric_kl(clean, noised)
            return ce + cfg.r3f.lam * kl, {"ce_loss": ce, "r3f_kl": kl}
        return r3f, None, None
    if kind == "recadam":
        return cross_entropy, _recadam_factory(classifier, start, cfg), None
    if kind == "mars":
        layers = [(w, start[name].to(w.device, w.dtype))  # once, not a copy per step
                  for name, w in layer_weights(classifier.backbone.encoder, "encoder.")]

        def project() -> None:
            for weight, origin in layers:
                mars_project(weight, origin, cfg.mars.radius)
            mars_project(classifier.head.weight, None, cfg.mars.head_radius)
        return cross_entropy, None, project
    return cross_entropy, None, None


def _recadam_factory(classifier: nn.Module, start: dict, cfg):
    """RecAdam over the train loop's decay groups; backbone tensors are pulled to `start`."""
    names = {id(p): n for n, p in classifier.named_parameters()}

    def make(groups: list[dict], lr: float, betas: tuple[float, float]) -> torch.optim.Optimizer:
        starts = {}
        for group in groups:
            for p in group["params"]:
                name = names[id(p)]
                if name.startswith("backbone."):
                    starts[p] = start[name[len("backbone."):]]
        rec = cfg.recadam
        return RecAdam(groups, lr=lr, betas=betas, k=rec.anneal_k, t0=rec.anneal_t0,
                       coef=rec.pretrain_coef, starts=starts)
    return make
