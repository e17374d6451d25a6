"""Typed, frozen settings of one trial. Built once from a space file; no Ray, no torch."""
from __future__ import annotations

import dataclasses

METHODS = ("finetune", "further_pretrain", "self_distill")
# Ray Train's placement strategies: pack ranks on few nodes (fast all-reduce) or spread them.
PLACEMENTS = {"pack": "PACK", "spread": "SPREAD", "strict_pack": "STRICT_PACK",
              "strict_spread": "STRICT_SPREAD"}

SIGNALS = ("knn", "none")
# Fine-tuning augmentation of images: the reference's horizontal flip, a random resized crop
# (scale 0.08-1) plus flip, or none.
AUGMENTS = ("flip", "rrc", "none")
# fp32 (the paper's), tf32 matmuls, or bf16 autocast; CPUs always run fp32.
PRECISIONS = ("fp32", "tf32", "bf16")
# auto: cache f_teacher(D_u) when a round draws at least len(D_u) samples; on: always; off: never.
TEACHER_CACHE = ("auto", "on", "off")


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """One training stage: a fixed step budget, AdamW, linear warm-up then linear decay."""

    steps: int
    batch_size: int  # global, split evenly across workers
    lr: float
    weight_decay: float = 0.01
    warmup_steps: int = 0
    beta2: float = 0.999
    grad_clip: float = 0.0  # 0 = no clipping


@dataclasses.dataclass(frozen=True)
class TrialConfig:
    model: str
    weights: str
    data: str
    method: str = "self_distill"
    mask_ratio: float = 0.75  # gamma
    rounds: int = 1  # T'
    mae_weight: float = 1.0  # lambda
    further_pretrain: StageConfig = StageConfig(steps=100, batch_size=64, lr=1.5e-4, beta2=0.95)
    self_distill: StageConfig = StageConfig(steps=100, batch_size=64, lr=1.5e-4, beta2=0.95)
    finetune: StageConfig = StageConfig(steps=100, batch_size=32, lr=1e-4, warmup_steps=10, grad_clip=1.0)
    eval_batch_size: int = 256
    eval_every: int = 0  # fine-tuning steps between validation passes (0 = only at the end)
    eval_max_examples: int = 0  # evaluate on the first N examples of each split (0 = all)
    val_fraction: float = 0.1  # of train held out for validation when the data has no val split
    finetune_dropout: float = 0.1  # hidden dropout while fine-tuning (the reference's 0.1)
    finetune_augment: str = "flip"  # a key of AUGMENTS
    precision: str = "bf16"  # a key of PRECISIONS
    signal: str = "knn"  # early signal after each pre-training stage: a key of SIGNALS
    signal_examples: int = 10000  # k-NN bank and queries: the first N of D_u and of val (0 = all)
    teacher_cache: str = "auto"  # a key of TEACHER_CACHE
    max_length: int = 128  # text models: tokens per example
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 100
    num_workers: int = 1  # Ray Train workers (DDP ranks)
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    loader_workers: int = 0  # DataLoader processes per rank
    placement: str = "pack"  # a key of PLACEMENTS
    custom_resources: tuple[tuple[str, float], ...] = ()  # per worker, e.g. (("a100", 1),)
    accelerator_type: str | None = None  # e.g. "A100": only nodes with that GPU
    keep_checkpoints: bool = False  # keep a completed trial's Ray Train checkpoints

    def worker_resources(self) -> dict[str, float]:
        """What one Ray Train worker asks of a node."""
        return {"CPU": self.cpus_per_worker, **({"GPU": 1} if self.use_gpu else {}),
                **dict(self.custom_resources)}

    def pretrain_stages(self) -> int:
        """Stages before fine-tuning: further pre-training and the T' rounds."""
        return len(self.stages()) - 1

    def stages(self) -> list[tuple[str, int]]:
        """The trial's plan as (stage, round) pairs, in order."""
        plan: list[tuple[str, int]] = []
        if self.method != "finetune":
            plan.append(("further_pretrain", 0))
        if self.method == "self_distill":
            plan += [("self_distill", t) for t in range(1, self.rounds + 1)]
        return plan + [("finetune", 0)]
