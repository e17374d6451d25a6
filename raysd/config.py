"""The settings of one trial, in the space file's shape, each declared once (schema.py).

Every field says its default, its rule, whether a space may search it and which stage
outputs it can change; artifact keys are built from those declarations, and
tests/test_schema.py refuses a field that declares nothing. No Ray, no torch.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from raysd.errors import ConfigError
from raysd.schema import (BOOLEAN, EVERYTHING, NOTHING, OWN_STAGE, PRETRAIN, Rule, flatten, integer,
                          number, one_of, section, setting, text)

# Each method runs one of three plans; the baselines and ablations are settings of a plan's
# stages (`effective`), so they share every stage artifact they compute alike.
PLANS = {"finetune": "finetune", "recadam": "finetune", "mars": "finetune", "r3f": "finetune",
         "further_pretrain": "further_pretrain", "further_pretrain_2x": "further_pretrain",
         "self_distill": "self_distill", "no_mae": "self_distill",
         "match_predictions": "self_distill", "match_weights_l2": "self_distill",
         "match_weights_mars": "self_distill"}
METHODS = tuple(PLANS)
# What a self-distillation round matches with its teacher (Table 3): f(x) (the paper's), the
# reconstructions g(f(x^)) on the masked input, or the encoder's weights (L2 or MARS distance).
TARGETS = ("representation", "predictions", "weights_l2", "weights_mars")
# A fine-tuning regulariser towards the weights fine-tuning starts from (Table 1's baselines).
REGULARISERS = ("none", "recadam", "mars", "r3f")
NOISE = ("normal", "uniform")
# How image folders are brought to the model's square size: squash (resize both sides; the
# reference's feature extractor) or crop (resize the short side, centre crop).
RESIZES = ("squash", "crop")
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
RESERVED_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


def _custom_ok(value: Any) -> bool:
    pairs = value.items() if isinstance(value, dict) else value
    try:
        return all(isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
                   and v > 0 for k, v in pairs)
    except (TypeError, ValueError):
        return False


CUSTOM = Rule(lambda v: isinstance(v, (dict, tuple, list)) and _custom_ok(v),
              "a mapping of resource name -> amount > 0",
              lambda v: tuple(sorted((k, float(n)) for k, n in (v.items() if isinstance(v, dict) else v))))
OPTIONAL_TEXT = Rule(lambda v: v is None or (isinstance(v, str) and bool(v)), "a GPU type such as A100 or H100")

# The keys of a stage section, shared by the three stages; only their defaults differ.
_STAGE = dict(changes=OWN_STAGE)


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """One training stage: a fixed step budget, AdamW, linear warm-up then linear decay."""

    steps: int = setting(100, integer(1), **_STAGE)
    batch_size: int = setting(64, integer(1), **_STAGE, doc="global, split evenly across workers")
    lr: float = setting(1.5e-4, number(0, low_open=True), **_STAGE)
    weight_decay: float = setting(0.01, number(0), **_STAGE)
    warmup_steps: int = setting(0, integer(0), **_STAGE)
    beta2: float = setting(0.95, number(0, 1, low_open=True), **_STAGE)
    grad_clip: float = setting(0.0, number(0), **_STAGE, doc="0 = no clipping")


@dataclasses.dataclass(frozen=True)
class DistillConfig(StageConfig):
    """A round of self-distillation: the stage settings, plus T', lambda and the teacher cache."""

    rounds: int = setting(1, integer(0), changes=NOTHING,
                          doc="T': round t's output does not depend on how many rounds follow it")
    mae_weight: float = setting(1.0, number(0), changes=("self_distill",), doc="lambda")
    teacher_cache: str = setting("auto", one_of(*TEACHER_CACHE), changes=("self_distill",),
                                 doc="keyed as what it resolves to: on or off (dropped from the key "
                                     "unless target is representation)")
    target: str = setting("representation", one_of(*TARGETS), changes=("self_distill",),
                          doc="what the student matches with its teacher; set by the match_* methods")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig(StageConfig):
    """Fine-tuning on D_tr: the stage settings (the reference's defaults), dropout, augmentation."""

    batch_size: int = setting(32, integer(1), **_STAGE, doc="global, split evenly across workers")
    lr: float = setting(1e-4, number(0, low_open=True), **_STAGE)
    warmup_steps: int = setting(10, integer(0), **_STAGE)
    beta2: float = setting(0.999, number(0, 1, low_open=True), **_STAGE)
    grad_clip: float = setting(1.0, number(0), **_STAGE, doc="0 = no clipping")
    dropout: float = setting(0.1, number(0, 1), changes=("finetune",),
                             doc="hidden dropout while fine-tuning (the reference's 0.1)")
    augment: str = setting("flip", one_of(*AUGMENTS), changes=("finetune",))
    seed: int | None = setting(None, Rule(lambda v: v is None or integer(0).ok(v),
                                          "an integer >= 0, or null (the trial's seed)"),
                               changes=("finetune",), searchable=False,
                               doc="fine-tuning's own seed (head init, batch order, dropout) over "
                                   "pre-training made with the trial's seed; null: the trial's seed")
    regulariser: str = setting("none", one_of(*REGULARISERS), changes=("finetune",),
                               doc="towards the starting weights; set by the recadam, mars and r3f methods")


@dataclasses.dataclass(frozen=True)
class RecAdamConfig:
    """RecAdam (Chen et al. 2020): Adam whose step is lambda(t) * Adam's plus a pull
    (1 - lambda(t)) * coef * (theta - theta_start), lambda(t) = sigmoid(k (t - t0))."""

    anneal_k: float = setting(0.5, number(0, low_open=True), changes=("finetune",),
                              doc="slope of the sigmoid annealing (RecAdam's default)")
    anneal_t0: int = setting(1000, integer(0), changes=("finetune",),
                             doc="its midpoint in steps (RecAdam's default)")
    pretrain_coef: float = setting(5000.0, number(0), changes=("finetune",),
                                   doc="coefficient of the quadratic pull (RecAdam's default)")


@dataclasses.dataclass(frozen=True)
class MarsConfig:
    """MARS (Gouk et al. 2021): after every step each layer's rows are scaled back into an
    L1 ball around the starting weights, so ||W - W_start||_inf-op <= radius."""

    radius: float = setting(6.6, number(0, low_open=True), changes=("finetune",),
                            doc="encoder layers (the MARS README's example)")
    head_radius: float = setting(7.6, number(0, low_open=True), changes=("finetune",),
                                 doc="the fresh head, around 0 (the MARS README's example)")


@dataclasses.dataclass(frozen=True)
class R3FConfig:
    """R3F (Aghajanyan et al. 2021): CE + lam * symmetric KL between outputs on the input
    embeddings and on the embeddings plus noise."""

    lam: float = setting(1.0, number(0), changes=("finetune",), doc="lambda (fairseq's default)")
    eps: float = setting(1e-5, number(0, low_open=True), changes=("finetune",),
                         doc="noise scale (fairseq's default)")
    noise: str = setting("normal", one_of(*NOISE), changes=("finetune",),
                         doc="normal: N(0, eps^2); uniform: U(-eps, eps)")


@dataclasses.dataclass(frozen=True)
class EvaluationConfig:
    batch_size: int = setting(256, integer(1), changes=("self_distill",),
                              doc="also the batch of cached teacher targets, the only place it "
                                  "changes an artifact (dropped from the key when not cached)")
    every: int = setting(0, integer(0), changes=NOTHING,
                         doc="fine-tuning steps between validation passes (0 = only at the end)")
    max_examples: int = setting(0, integer(0), changes=("finetune",),
                                doc="evaluate on the first N examples of each split (0 = all)")
    signal: str = setting("knn", one_of(*SIGNALS), changes=("signal",),
                          doc="early signal after each pre-training stage")
    signal_examples: int = setting(10000, integer(0), changes=("signal",),
                                   doc="k-NN bank and queries: a fixed random subset of N of D_u "
                                       "and of val, the same for every trial (0 = all)")
    val_fraction: float = setting(0.1, number(0, 1), changes=EVERYTHING,
                                  doc="of train held out for validation when the data has no val "
                                      "split (0: none, as the reference; a study then needs val/); "
                                      "it changes D_u, so every stage")


@dataclasses.dataclass(frozen=True)
class ResourcesConfig:
    workers: int = setting(1, integer(1), changes=("further_pretrain", "self_distill", "finetune"),
                           doc="Ray Train workers (DDP ranks); each rank draws its own masks")
    use_gpu: bool = setting(False, BOOLEAN, changes=EVERYTHING, searchable=False)
    cpus_per_worker: float = setting(1.0, number(0, low_open=True), changes=NOTHING, searchable=False)
    loader_workers: int = setting(0, integer(0), changes=NOTHING, searchable=False,
                                  doc="DataLoader processes per rank; batches are drawn by step")
    placement: str = setting("pack", one_of(*PLACEMENTS), changes=NOTHING, searchable=False)
    custom: tuple[tuple[str, float], ...] = setting((), CUSTOM, changes=NOTHING, searchable=False,
                                                   doc="per worker, e.g. {a100: 1}")
    accelerator_type: str | None = setting(None, OPTIONAL_TEXT, changes=NOTHING, searchable=False,
                                           doc="e.g. A100: only nodes with that GPU")


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    log_every: int = setting(10, integer(1), changes=NOTHING, searchable=False)
    checkpoint_every: int = setting(100, integer(1), changes=NOTHING, searchable=False)
    keep_checkpoints: bool = setting(False, BOOLEAN, changes=NOTHING, searchable=False,
                                     doc="keep a completed trial's Ray Train checkpoints")


@dataclasses.dataclass(frozen=True)
class TrialConfig:
    """One trial, as the space file writes it: cfg.self_distill.rounds is YAML's
    self_distill.rounds, Parquet's cfg.self_distill.rounds and Optuna's self_distill.rounds."""

    model: str = setting(None, text("a model name such as vit_tiny"), changes=EVERYTHING)
    weights: str = setting("none", text("a weights source such as timm:NAME, hf:ID or a folder"),
                           changes=EVERYTHING)
    data: str = setting(None, text("a data source such as builtin:digits"), changes=EVERYTHING)
    method: str = setting("self_distill", one_of(*METHODS), changes=NOTHING,
                          doc="which stages run; a stage computes the same under every method")
    seed: int = setting(0, integer(0), changes=EVERYTHING)
    mask_ratio: float = setting(0.75, number(0, 1, low_open=True), changes=PRETRAIN, doc="gamma")
    max_length: int = setting(128, integer(1), changes=EVERYTHING,
                              doc="text models: tokens per example (dropped from image keys)")
    precision: str = setting("bf16", one_of(*PRECISIONS), changes=EVERYTHING,
                             doc="keyed as what runs: fp32 on a CPU")
    image_resize: str = setting("crop", one_of(*RESIZES), changes=EVERYTHING,
                                doc="image folders: squash (the reference's) or crop")
    further_pretrain: StageConfig = section(StageConfig)
    self_distill: DistillConfig = section(DistillConfig)
    finetune: FinetuneConfig = section(FinetuneConfig)
    recadam: RecAdamConfig = section(RecAdamConfig)
    mars: MarsConfig = section(MarsConfig)
    r3f: R3FConfig = section(R3FConfig)
    evaluation: EvaluationConfig = section(EvaluationConfig)
    resources: ResourcesConfig = section(ResourcesConfig)
    logging: LoggingConfig = section(LoggingConfig)

    def worker_resources(self) -> dict[str, float]:
        """What one Ray Train worker asks of a node."""
        res = self.resources
        return {"CPU": res.cpus_per_worker, **({"GPU": 1} if res.use_gpu else {}), **dict(res.custom)}

    def pretrain_stages(self) -> int:
        """Stages before fine-tuning: further pre-training and the T' rounds."""
        return len(self.stages()) - 1

    def stages(self) -> list[tuple[str, int]]:
        """The trial's plan as (stage, round) pairs, in order."""
        plan: list[tuple[str, int]] = []
        if PLANS[self.method] != "finetune":
            plan.append(("further_pretrain", 0))
        if PLANS[self.method] == "self_distill":
            plan += [("self_distill", t) for t in range(1, self.self_distill.rounds + 1)]
        return plan + [("finetune", 0)]

    def effective(self) -> "TrialConfig":
        """The settings the stages run under: a baseline or ablation is its plan's stages with
        the settings that make it (no_mae: lambda = 0; further_pretrain_2x: twice the steps;
        match_*: the distillation target; recadam, mars, r3f: the fine-tuning regulariser).
        Call it once per trial: further_pretrain_2x doubles whatever steps it is given."""
        fp, sd, ft = self.further_pretrain, self.self_distill, self.finetune
        change = {
            "no_mae": {"self_distill": dataclasses.replace(sd, mae_weight=0.0)},
            "further_pretrain_2x": {"further_pretrain": dataclasses.replace(fp, steps=2 * fp.steps)},
            "match_predictions": {"self_distill": dataclasses.replace(sd, target="predictions")},
            "match_weights_l2": {"self_distill": dataclasses.replace(sd, target="weights_l2")},
            "match_weights_mars": {"self_distill": dataclasses.replace(sd, target="weights_mars")},
            **{m: {"finetune": dataclasses.replace(ft, regulariser=m)} for m in ("recadam", "mars", "r3f")},
        }.get(self.method, {})
        return dataclasses.replace(self, **change)


STAGES = ("further_pretrain", "self_distill", "finetune")
# Every model raysd builds, by family; raysd.models registers their builders (a test checks
# the two agree). Here so that checking a config imports no torch: trial drivers check theirs.
MODEL_FAMILIES = {"vit_tiny": "vit", "vit_small": "vit", "vit_base_mae": "vit",
                  "roberta_tiny": "roberta", "roberta_base": "roberta"}
FAMILY_MODALITY = {"vit": "image", "roberta": "text"}  # what a family's models read


def check(cfg: TrialConfig, where: str) -> None:
    """The rules between settings, which no single field can state."""
    def require(ok: bool, key: str, what: str, got: Any) -> None:
        if not ok:
            raise ConfigError(f"{where}: {key}: must be {what} (got {got!r})")

    require(cfg.model in MODEL_FAMILIES, "model", f"one of {', '.join(sorted(MODEL_FAMILIES))}", cfg.model)
    res = cfg.resources
    for stage in STAGES:
        scfg = getattr(cfg, stage)
        require(scfg.warmup_steps <= scfg.steps, f"{stage}.warmup_steps",
                f"at most {stage}.steps = {scfg.steps}", scfg.warmup_steps)
    require(cfg.evaluation.every <= cfg.finetune.steps, "evaluation.every",
            f"at most finetune.steps = {cfg.finetune.steps} (0: only at the end)", cfg.evaluation.every)
    for stage in STAGES:
        batch = getattr(cfg, stage).batch_size
        require(batch % res.workers == 0, f"{stage}.batch_size",
                f"divisible by resources.workers={res.workers} (it is the global batch)", batch)
    reserved = set(RESERVED_RESOURCES) & {k for k, _ in res.custom}
    require(not reserved, "resources.custom", "free of CPU/GPU/memory (they have their own keys)",
            dict(res.custom))
    require(res.accelerator_type is None or res.use_gpu, "resources.accelerator_type",
            "set only with resources.use_gpu: true", res.accelerator_type)
    if cfg.effective().finetune.regulariser == "recadam":
        # RecAdam's pull moves theta - theta_init by (1 - lr (1 - lambda) coef) per step while
        # lambda(t) ~ 0: at lr * coef >= 2 it grows every step and fine-tuning diverges.
        limit = 2 / cfg.finetune.lr
        require(cfg.recadam.pretrain_coef < limit, "recadam.pretrain_coef",
                f"below 2 / finetune.lr = {limit:g}, or RecAdam's pull diverges (RecAdam's own "
                f"setting has lr x coef = 0.1)", cfg.recadam.pretrain_coef)


def columns(cfg: TrialConfig) -> dict[str, Any]:
    """The `cfg.*` columns of a trials.parquet row: every setting under its dotted name."""
    out = {}
    for name, value in flatten(cfg).items():
        if name == "resources.custom":  # a JSON object: Parquet cannot hold rows of varying keys
            value = json.dumps(dict(value), sort_keys=True)
        out[f"cfg.{name}"] = value
    return out


# Studies written before the schema named settings by their old field names; readers rename
# those columns so old and new studies read alike.
LEGACY_COLUMNS = {f"cfg.{old}": f"cfg.{new}" for old, new in {
    "rounds": "self_distill.rounds", "mae_weight": "self_distill.mae_weight",
    "teacher_cache": "self_distill.teacher_cache", "eval_batch_size": "evaluation.batch_size",
    "eval_every": "evaluation.every", "eval_max_examples": "evaluation.max_examples",
    "signal": "evaluation.signal", "signal_examples": "evaluation.signal_examples",
    "val_fraction": "evaluation.val_fraction", "finetune_dropout": "finetune.dropout",
    "finetune_augment": "finetune.augment", "log_every": "logging.log_every",
    "checkpoint_every": "logging.checkpoint_every", "keep_checkpoints": "logging.keep_checkpoints",
    "num_workers": "resources.workers", "use_gpu": "resources.use_gpu",
    "cpus_per_worker": "resources.cpus_per_worker", "loader_workers": "resources.loader_workers",
    "placement": "resources.placement", "custom_resources": "resources.custom",
    "accelerator_type": "resources.accelerator_type"}.items()}


def current_columns(names: list[str]) -> dict[str, str]:
    """{old column: its current name} for the legacy columns among `names`."""
    return {old: new for old, new in LEGACY_COLUMNS.items() if old in names and new not in names}
