"""The paper's two losses, MAE's shuffle masking and the prediction-matching ablation's
distances. Pure tensor code, no model, no Ray."""
from __future__ import annotations

import torch


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Visible patches per image: round(K * (1 - gamma)), at least one visible and one masked."""
    return min(max(round(num_patches * (1.0 - mask_ratio)), 1), num_patches - 1)


def shuffle_mask(
    batch: int, num_patches: int, mask_ratio: float, *, noise: torch.Tensor | None = None,
    device: torch.device | str = "cpu", generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image random masking (MAE): keep the patches with the smallest noise.

    Returns ids_keep [B, V], ids_restore [B, K] and mask [B, K] (1 = masked, in patch order).
    """
    if noise is None:
        noise = torch.rand(batch, num_patches, device=device, generator=generator)
    keep = num_visible(num_patches, mask_ratio)
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    mask = torch.ones(batch, num_patches, device=noise.device)
    mask[:, :keep] = 0
    mask = mask.gather(1, ids_restore)
    return ids_shuffle[:, :keep], ids_restore, mask


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, K, p*p*C] in MAE's (row, col, p, p, C) order."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


def mae_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MSE on masked patches only, targets normalised per patch (MAE's norm_pix_loss).

    pred, target: [B, K, p*p*C]; mask: [B, K] with 1 on masked patches.
    """
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    target = (target - mean) / (var + 1e-6) ** 0.5
    per_patch = ((pred - target) ** 2).mean(dim=-1)  # [B, K]
    return (per_patch * mask).sum() / mask.sum()


def distill_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Batch mean of ||f_student(x) - StopGrad(f_teacher(x))||_2^2; both [B, D]."""
    return (student - teacher.detach()).pow(2).sum(dim=-1).mean()


def masked_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Match predictions (ViT): squared error per value, averaged over the masked patches;
    student, teacher [B, K, P], the teacher's held fixed; mask [B, K] with 1 on masked patches."""
    diff = student - teacher.detach()
    per_patch = diff.pow(2).mean(dim=-1)  # [B, K]
    return per_patch.mul(mask).sum() / mask.sum()


def token_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Match predictions (RoBERTa): mean over the masked tokens of KL(p_teacher || p_student),
    both [M, V] logits, the teacher's held fixed; 0 for no tokens."""
    log_t = torch.log_softmax(teacher_logits.detach().float(), -1)
    log_s = torch.log_softmax(student_logits.float(), -1)
    per_token = (log_t.exp() * (log_t - log_s)).sum(-1)  # [M]
    return per_token.sum() / max(1, per_token.shape[0])
