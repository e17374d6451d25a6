"""The paper's fine-tuning baselines and weight-matching ablations as tensor code, free of Ray:

  RecAdam        Adam with an annealed quadratic pull towards the starting weights  (Chen et al. 2020)
  mars_project   each layer's rows back into an L1 ball around the starting weights (Gouk et al. 2021)
  symmetric_kl   R3F's KL(p || q) + KL(q || p) between clean and noised outputs  (Aghajanyan et al. 2021)
  l2_distance, mars_distance   between a student's and a teacher's weights (Table 3's ablations)
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

# The layers MARS constrains, each weight read as [out, in...]: a row per output unit.
LAYERS = (nn.Linear, nn.Conv2d, nn.Embedding)


def anneal(step: int, k: float, t0: int) -> float:
    """RecAdam's sigmoid annealing lambda(t) = 1 / (1 + exp(-k (t - t0))), t counted from 1."""
    z = -k * (step - t0)
    return 0.0 if z > 700 else 1.0 / (1.0 + math.exp(z))


class RecAdam(torch.optim.Optimizer):
    """RecAdam's update, per parameter p with a start tensor (`starts[p]`):
        m, v = Adam's moments;  step = lr * sqrt(1 - b2^t) / (1 - b1^t)
        p -= step * lambda(t) * m / (sqrt(v) + eps)
        p -= lr * (1 - lambda(t)) * coef * (p - start)
        p -= lr * weight_decay * p
    A parameter without one (the fresh head) takes plain Adam with the same decay. The starts
    stay out of the optimizer's state dict: they are the weights the stage started from."""

    def __init__(self, params, lr: float, betas: tuple[float, float], k: float, t0: int,
                 coef: float, starts: dict, eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      k=k, t0=t0, coef=coef))
        self.starts = {p: start.detach().to(p.device, p.dtype) for p, start in starts.items()}

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                start = self.starts.get(p)
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                denom = exp_avg_sq.sqrt().add_(group["eps"])
                step_size = group["lr"] * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
                if start is None:
                    p.addcdiv_(exp_avg, denom, value=-step_size)
                else:
                    lam = anneal(t, group["k"], group["t0"])
                    p.addcdiv_(exp_avg, denom, value=-step_size * lam)
                    p.add_(p - start, alpha=-group["lr"] * (1 - lam) * group["coef"])
                if group["weight_decay"] > 0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])
        return None


def layer_weights(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """(state-dict name, weight) of every Linear, Conv2d and Embedding layer in `module`."""
    for name, layer in module.named_modules():
        if isinstance(layer, LAYERS):
            yield f"{prefix}{name}.weight" if name else f"{prefix}weight", layer.weight


def rows(weight: torch.Tensor) -> torch.Tensor:
    """A layer's weight as [out, in...] rows: Linear [out, in], Conv [out, in*kh*kw], Embedding [V, D]."""
    return weight.reshape(weight.shape[0], -1)


def mars_norm(diff: torch.Tensor) -> torch.Tensor:
    """The maximum absolute row sum (the infinity-operator norm) of a layer's weight."""
    return rows(diff).abs().sum(dim=1).max()


@torch.no_grad()
def mars_project(weight: torch.Tensor, start: torch.Tensor | None, radius: float) -> None:
    """In place: each row r of W - start with ||r||_1 > radius is scaled to ||r||_1 = radius
    (Gouk et al.'s projection, per output unit); start None means around 0."""
    base = torch.zeros_like(weight) if start is None else start.to(weight.device, weight.dtype)
    diff = rows(weight - base)
    scale = (diff.abs().sum(dim=1, keepdim=True) / radius).clamp(min=1.0)
    weight.copy_(base + (diff / scale).view_as(weight))


def l2_distance(student: nn.Module, teacher: dict[str, torch.Tensor], prefix: str = "") -> torch.Tensor:
    """||theta - theta_teacher||_2^2 over the student's trained parameters."""
    total = 0.0
    for name, param in student.named_parameters():
        if param.requires_grad:
            total = total + (param.float() - teacher[prefix + name].float()).pow(2).sum()
    return total


def mars_distance(student: nn.Module, teacher: dict[str, torch.Tensor], prefix: str = "") -> torch.Tensor:
    """Sum over the student's Linear, Conv2d and Embedding layers of ||W - W_teacher||_inf-op."""
    total = 0.0
    for name, weight in layer_weights(student, prefix):
        if weight.requires_grad:
            total = total + mars_norm(weight.float() - teacher[name].float())
    return total


def symmetric_kl(logits: torch.Tensor, noised: torch.Tensor) -> torch.Tensor:
    """Batch mean of KL(p || q) + KL(q || p), p = softmax(logits), q = softmax(noised); both
    [B, C], gradients through both (fairseq's R3F)."""
    log_p, log_q = F.log_softmax(logits.float(), -1), F.log_softmax(noised.float(), -1)
    both = (log_p.exp() * (log_p - log_q)).sum(-1) + (log_q.exp() * (log_q - log_p)).sum(-1)
    return both.mean()


def embedding_noise(kind: str, eps: float):
    """R3F's perturbation of input embeddings [B, ..., D] -> [2B, ..., D]: the clean batch, then
    a detached copy plus N(0, eps^2) or U(-eps, eps) noise (fairseq noises a detached copy)."""
    def perturb(embeddings: torch.Tensor) -> torch.Tensor:
        # Drawn in the shape's own order (randn_like would follow a transposed tensor's strides).
        draw = torch.randn if kind == "normal" else torch.rand
        noise = draw(embeddings.shape, device=embeddings.device, dtype=embeddings.dtype)
        noise = noise * eps if kind == "normal" else (noise * 2 - 1) * eps
        return torch.cat([embeddings, embeddings.detach() + noise])
    return perturb
