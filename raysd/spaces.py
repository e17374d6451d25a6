"""Search spaces: YAML -> a validated Space (trial defaults, study settings, searched params).

Everything is checked before Ray starts; a problem is one ConfigError naming file and key.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib.resources
import math
import operator
import re
from pathlib import Path
from typing import Any

import yaml

from raysd import models
from raysd.config import (AUGMENTS, METHODS, PLACEMENTS, PRECISIONS, SIGNALS, TEACHER_CACHE,
                          StageConfig, TrialConfig)
from raysd.errors import ConfigError

# The repository's search_spaces/ folder, installed as the package raysd.search_spaces.
SPACES_DIR = Path(str(importlib.resources.files("raysd.search_spaces")))

STAGE_KEYS = {f.name for f in dataclasses.fields(StageConfig)}
SCHEMA: dict[str, Any] = {
    "description": str, "model": str, "weights": str, "data": str, "method": str, "seed": int,
    "mask_ratio": float, "max_length": int, "precision": str,
    "further_pretrain": STAGE_KEYS,
    "self_distill": STAGE_KEYS | {"rounds", "mae_weight", "teacher_cache"},
    "finetune": STAGE_KEYS | {"dropout", "augment"},
    "evaluation": {"batch_size", "every", "max_examples", "signal", "signal_examples", "val_fraction"},
    "resources": {"workers", "use_gpu", "cpus_per_worker", "loader_workers", "placement", "custom",
                  "accelerator_type"},
    "logging": {"log_every", "checkpoint_every", "keep_checkpoints"},
    "study": {"num_samples", "metric", "mode", "seed", "n_startup_trials", "max_concurrent",
              "max_failures", "scheduler", "smoke", "artifacts", "optuna_storage", "keep_models",
              "loggers"},
    "search": dict,
}
# ASHA acts on the early signal at stage boundaries; its clock is pre-training stages done.
SCHEDULER_KEYS = {"type", "grace_period", "reduction_factor"}
KEEP_MODELS = ("best", "all", "none")
LOGGERS = ("mlflow", "wandb")
PARAM_KEYS = {"type", "low", "high", "log", "step", "choices", "when"}


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `3e-4` as a string; researchers write learning rates that way."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)


_OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le,
        "==": operator.eq, "!=": operator.ne}


@dataclasses.dataclass(frozen=True)
class Param:
    key: str  # dotted key of the space file, e.g. "self_distill.mae_weight"
    type: str  # float | int | choice
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple = ()
    when: tuple[str, str, float] | None = None  # (other key, operator, value)

    def active(self, values: dict) -> bool:
        if self.when is None:
            return True
        key, op, value = self.when
        return key in values and _OPS[op](values[key], value)

    def suggest(self, trial) -> Any:
        """Ask an Optuna trial (or Tune's captor of one) for this parameter."""
        if self.type == "float":
            return trial.suggest_float(self.key, self.low, self.high, log=self.log, step=self.step)
        if self.type == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log,
                                     step=int(self.step or 1))
        return trial.suggest_categorical(self.key, list(self.choices))


@dataclasses.dataclass(frozen=True)
class StudySettings:
    num_samples: int = 8
    metric: str = "val_accuracy"
    mode: str = "max"
    seed: int = 0
    n_startup_trials: int = 10
    max_concurrent: int = 0  # 0 = as many as the search proposes at once (see study.py)
    # Ray Train restarts of a trial's workers (a lost node, a preempted GPU), each resuming from
    # the latest step checkpoint; errors that would recur fail the trial at once instead.
    max_failures: int = 2
    scheduler: dict | None = None  # {"type": "asha", "metric": ..., "grace_period": ...}
    smoke: bool = False  # a --smoke run: shrunk to check the wiring, never a result
    # Where stage outputs are shared: None = <study>/artifacts, "none" = no reuse, or a URI
    # that several studies share.
    artifacts: str | None = None
    # Where the Optuna study lives: None = a journal file in the study folder, or an RDB URL.
    optuna_storage: str | None = None
    keep_models: str = "best"  # fine-tuned models kept under <study>/models: best | all | none
    loggers: list | None = None  # extra trackers fed through Ray's logger callbacks: mlflow, wandb


@dataclasses.dataclass(frozen=True)
class Space:
    name: str
    source: str  # file path or URI, for messages
    doc: dict  # the resolved file (overrides applied), without "search" and "study"
    study: StudySettings
    params: tuple[Param, ...]

    @property
    def description(self) -> str:
        return self.doc.get("description", "")

    def trial_config(self, values: dict | None = None) -> TrialConfig:
        """The TrialConfig of the file's defaults with searched `values` (dotted keys) applied."""
        doc = copy.deepcopy(self.doc)
        for key, value in (values or {}).items():
            _set(doc, key, value)
        return trial_config(doc, self.source)


def _set(doc: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        doc = doc.setdefault(part, {})
    doc[leaf] = value


def _get(doc: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        doc = doc[part]
    return doc


def available() -> dict[str, Path]:
    return {p.stem: p for p in sorted(SPACES_DIR.glob("*.yaml"))}


def resolve_path(name_or_path: str) -> Path:
    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"space file {name_or_path} does not exist")
        return path.resolve()
    spaces = available()
    if name_or_path not in spaces:
        raise ConfigError(f"unknown space {name_or_path!r} (known: {', '.join(spaces)})")
    return spaces[name_or_path]


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`--set KEY=VALUE` pairs; VALUE is read as YAML (numbers, booleans, lists)."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        try:
            out[key.strip()] = _yaml(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item!r}: VALUE is not valid YAML "
                              f"({str(err).splitlines()[0]})") from None
    return out


def load_space(name_or_path: str, overrides: dict[str, Any] | None = None) -> Space:
    path = resolve_path(name_or_path)
    return load_space_text(path.read_text(), str(path), path.stem, overrides)


def load_space_text(text: str, where: str, name: str,
                    overrides: dict[str, Any] | None = None) -> Space:
    """Parse and validate a space; `where` names its source in every error."""
    try:
        doc = _yaml(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    for key, value in (overrides or {}).items():
        _override(doc, key, value)
    for key, value in doc.items():
        if key not in SCHEMA:
            raise ConfigError(f"{where}: unknown key {key!r} (known: {', '.join(SCHEMA)})")
        if isinstance(SCHEMA[key], set):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {key}: expected a mapping")
            for sub in value:
                if sub not in SCHEMA[key]:
                    raise ConfigError(f"{where}: unknown key {key}.{sub} (known: {', '.join(sorted(SCHEMA[key]))})")
    search = doc.pop("search", None) or {}
    study = _study(doc.pop("study", None) or {}, where)
    params = _params(search, where)
    space = Space(name, where, doc, study, params)
    space.trial_config()  # defaults must be valid on their own
    for param in params:  # and so must every searched value's extremes
        for value in _extremes(param):
            try:
                space.trial_config({param.key: value})
            except ConfigError as err:
                raise ConfigError(f"{where}: search.{param.key}: value {value!r} in its range is "
                                  f"invalid: {str(err).split(': ', 2)[-1]}") from None
    _check_scheduler(space)
    return space


def pretrain_stages(space: Space) -> tuple[int, int]:
    """(fewest, most) pre-training stages of a trial over the searched range: ASHA's clock."""
    counts = [space.trial_config().pretrain_stages()] + [
        space.trial_config({p.key: v}).pretrain_stages() for p in space.params for v in _extremes(p)]
    return min(counts), max(counts)


def _check_scheduler(space: Space) -> None:
    """ASHA needs a signal to act on and a first rung that some trial reaches."""
    sched = space.study.scheduler
    if not sched:
        return
    cfg = space.trial_config()
    if cfg.signal == "none":
        raise ConfigError(f"{space.source}: study.scheduler: ASHA acts on the early signal; set "
                          "evaluation.signal: knn or remove the scheduler")
    searched = [p.key for p in space.params if p.key.split(".")[-1] in ("steps", "batch_size")
                and p.key.split(".")[0] in ("further_pretrain", "self_distill")]
    if searched:
        raise ConfigError(f"{space.source}: search.{searched[0]}: ASHA compares trials after equal "
                          "work; with a scheduler, pre-training budgets cannot be searched")
    _, most = pretrain_stages(space)
    grace = sched.get("grace_period", 1)
    if grace > most:
        raise ConfigError(f"{space.source}: study.scheduler.grace_period: must be at most {most}, "
                          f"the most pre-training stages a trial runs (got {grace})")


def _off(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.lower() == "none")


def _override(doc: dict, dotted: str, value: Any) -> None:
    """Apply one `--set KEY=VALUE`, where KEY is any dotted key of the space file:
    `study.scheduler.grace_period=2`, `study.scheduler=none`, `search.mask_ratio.high=0.8`,
    `search.finetune.lr=none` (stop searching it), `search.seed={type: int, low: 0, high: 3}`."""
    where = f"--set {dotted}"
    head, _, rest = dotted.partition(".")
    if head == "search" and rest:
        search = doc.get("search") or {}
        doc["search"] = search
        key, _, field = rest.rpartition(".")
        if key in search and field not in PARAM_KEYS:
            raise ConfigError(f"{where}: {field!r} is not a field of search.{key} "
                              f"(known: {', '.join(sorted(PARAM_KEYS))})")
        if key and field in PARAM_KEYS:
            if not isinstance(search.get(key), dict):
                raise ConfigError(f"{where}: {key!r} is not searched in this space "
                                  f"(searched: {', '.join(search) or 'none'})")
            search[key][field] = value
        elif _off(value):
            if rest not in search:
                raise ConfigError(f"{where}: {rest!r} is not searched in this space "
                                  f"(searched: {', '.join(search) or 'none'})")
            del search[rest]
        else:
            search[rest] = value  # a whole parameter, validated with the others
        return
    if dotted == "study.scheduler":
        doc.setdefault("study", {})["scheduler"] = None if _off(value) else value
        return
    if dotted.startswith("study.scheduler."):
        sub = dotted.split(".", 2)[2]
        if sub not in SCHEDULER_KEYS:
            raise ConfigError(f"{where}: unknown key (known: {', '.join(sorted(SCHEDULER_KEYS))})")
        study = doc.setdefault("study", {})
        if not isinstance(study.get("scheduler"), dict):
            study["scheduler"] = {"type": "asha"}  # setting a field turns ASHA on
        study["scheduler"][sub] = value
        return
    _check_key(dotted, where)
    _set(doc, dotted, value)


def _check_key(dotted: str, where: str) -> None:
    head, _, rest = dotted.partition(".")
    spec = SCHEMA.get(head)
    ok = spec is not None and ((not rest and head != "search") or
                               (isinstance(spec, set) and rest in spec) or spec is dict)
    if not ok:
        raise ConfigError(f"{where}: unknown key {dotted!r}")


def _extremes(param: Param) -> list:
    """The values a constraint must hold for: every choice, every int (up to a bound), float ends."""
    if param.type == "choice":
        return list(param.choices)
    if param.type == "int":
        values = range(int(param.low), int(param.high) + 1, int(param.step or 1))
        return list(values) if len(values) <= 4096 else [values[0], values[-1]]
    return [param.low, param.high]


def _study(raw: dict, where: str) -> StudySettings:
    fields = {f.name: f.type for f in dataclasses.fields(StudySettings)}
    for key in raw:
        if key not in fields:
            raise ConfigError(f"{where}: unknown key study.{key}")
    settings = StudySettings(**raw)
    for key, low in (("num_samples", 1), ("seed", 0), ("n_startup_trials", 0), ("max_concurrent", 0),
                     ("max_failures", -1)):
        value = getattr(settings, key)
        _require(_integer(value) and value >= low, where, f"study.{key}", f"an integer >= {low}", value)
    _require(settings.mode in ("max", "min"), where, "study.mode", "max or min", settings.mode)
    _require(isinstance(settings.metric, str) and bool(re.fullmatch(r"(val|train)_\w+", settings.metric)),
             where, "study.metric", "a validation metric such as val_accuracy or val_macro_f1 "
             "(test metrics are recorded, never used to choose)", settings.metric)
    _require(settings.artifacts is None or (isinstance(settings.artifacts, str) and settings.artifacts),
             where, "study.artifacts", "a folder or URI, or none", settings.artifacts)
    _require(settings.optuna_storage is None or (isinstance(settings.optuna_storage, str)
                                                  and "://" in settings.optuna_storage),
             where, "study.optuna_storage", "an RDB URL such as sqlite:///optuna.db", settings.optuna_storage)
    _require(settings.keep_models in KEEP_MODELS, where, "study.keep_models", " | ".join(KEEP_MODELS),
             settings.keep_models)
    _require(settings.loggers is None or (isinstance(settings.loggers, list)
                                          and set(settings.loggers) <= set(LOGGERS)),
             where, "study.loggers", f"a list of {', '.join(LOGGERS)}", settings.loggers)
    sched = settings.scheduler
    if sched is not None:
        _require(isinstance(sched, dict) and sched.get("type") == "asha", where, "study.scheduler.type",
                 "asha", sched.get("type") if isinstance(sched, dict) else sched)
        for key in sched:
            if key not in SCHEDULER_KEYS:
                raise ConfigError(f"{where}: unknown key study.scheduler.{key}")
        for key in ("grace_period", "reduction_factor"):
            if sched.get(key) is not None:
                _require(_integer(sched[key]) and sched[key] >= 1, where, f"study.scheduler.{key}",
                         "an integer >= 1", sched[key])
    return settings


def _params(search: dict, where: str) -> tuple[Param, ...]:
    if not isinstance(search, dict):
        raise ConfigError(f"{where}: search: expected a mapping of key -> parameter")
    params: list[Param] = []
    for key, spec in search.items():
        at = f"{where}: search.{key}"
        _check_key(key, f"{where}: search")
        if not isinstance(spec, dict):
            raise ConfigError(f"{at}: expected a mapping with type and range")
        for sub in spec:
            if sub not in PARAM_KEYS:
                raise ConfigError(f"{at}: unknown key {sub!r} (known: {', '.join(sorted(PARAM_KEYS))})")
        kind = spec.get("type")
        when = _when(spec.get("when"), params, at)
        if kind == "choice":
            choices = spec.get("choices")
            if not isinstance(choices, list) or not choices:
                raise ConfigError(f"{at}: choices must be a non-empty list")
            kinds = {_kind(c) for c in choices}
            if len(kinds) != 1 or None in kinds:
                raise ConfigError(f"{at}: choices must all be numbers, all strings or all booleans "
                                  f"(got {choices!r})")
            params.append(Param(key, kind, choices=tuple(choices), when=when))
            continue
        if kind not in ("float", "int"):
            raise ConfigError(f"{at}: type must be float, int or choice (got {kind!r})")
        low, high = spec.get("low"), spec.get("high")
        for name, value in (("low", low), ("high", high)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ConfigError(f"{at}: {name} must be a number (got {value!r})")
        if kind == "int" and (low != int(low) or high != int(high)):
            raise ConfigError(f"{at}: an int parameter needs integer low and high")
        if not low < high:
            raise ConfigError(f"{at}: low must be below high (got {low} >= {high})")
        log, step = spec.get("log", False), spec.get("step")
        if not isinstance(log, bool):
            raise ConfigError(f"{at}: log must be true or false (got {log!r})")
        if step is not None and not (_number(step) and step > 0):
            raise ConfigError(f"{at}: step must be a number > 0 (got {step!r})")
        param = Param(key, kind, float(low), float(high), log, step, when=when)
        _optuna_accepts(param, at)
        params.append(param)
    return tuple(params)


def _kind(value: Any) -> str | None:
    if isinstance(value, bool):
        return "bool"
    if _number(value):
        return "number"
    return "string" if isinstance(value, str) else None


def _optuna_accepts(param: Param, at: str) -> None:
    """Optuna's own rules (a step with log, an int step...), checked before Ray starts."""
    from optuna.distributions import FloatDistribution, IntDistribution

    try:
        if param.type == "float":
            FloatDistribution(param.low, param.high, log=param.log, step=param.step)
        else:
            IntDistribution(int(param.low), int(param.high), log=param.log, step=int(param.step or 1))
    except ValueError as err:
        raise ConfigError(f"{at}: {err}") from None
    if param.type == "int" and param.step is not None and param.step != int(param.step):
        raise ConfigError(f"{at}: an int parameter needs an integer step (got {param.step})")


def _when(raw, earlier: list[Param], at: str) -> tuple[str, str, float] | None:
    if raw is None:
        return None
    match = re.fullmatch(r"\s*([\w.]+)\s*(>=|<=|==|!=|>|<)\s*(-?[\d.eE+-]+)\s*", str(raw))
    if not match:
        raise ConfigError(f"{at}: when must read 'KEY OP NUMBER', e.g. 'self_distill.rounds > 0' (got {raw!r})")
    key, op, value = match.groups()
    if key not in {p.key for p in earlier}:
        raise ConfigError(f"{at}: when refers to {key!r}, which is not a searched parameter above it")
    return key, op, float(value)


def _require(ok: bool, where: str, key: str, what: str, got: Any) -> None:
    if not ok:
        raise ConfigError(f"{where}: {key}: must be {what} (got {got!r})")


def _stage(doc: dict, name: str, where: str) -> StageConfig:
    raw = {k: v for k, v in doc.get(name, {}).items() if k in STAGE_KEYS}
    defaults = getattr(TrialConfig, name)
    stage = dataclasses.replace(defaults, **raw)
    for key, ok, what in (
        ("steps", _integer(stage.steps) and stage.steps >= 1, "an integer >= 1"),
        ("batch_size", _integer(stage.batch_size) and stage.batch_size >= 1, "an integer >= 1"),
        ("lr", _number(stage.lr) and stage.lr > 0, "a number > 0"),
        ("weight_decay", _number(stage.weight_decay) and stage.weight_decay >= 0, "a number >= 0"),
        ("warmup_steps", _integer(stage.warmup_steps) and 0 <= stage.warmup_steps, "an integer >= 0"),
        ("beta2", _number(stage.beta2) and 0 < stage.beta2 < 1, "a number in (0, 1)"),
        ("grad_clip", _number(stage.grad_clip) and stage.grad_clip >= 0, "a number >= 0"),
        ("warmup_steps", stage.warmup_steps <= stage.steps, f"at most {name}.steps = {stage.steps}"),
    ):
        _require(ok, where, f"{name}.{key}", what, getattr(stage, key))
    return stage


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def trial_config(doc: dict, where: str) -> TrialConfig:
    """Validate a resolved space document and build the TrialConfig it describes."""
    sd, ev = doc.get("self_distill", {}), doc.get("evaluation", {})
    res, log = doc.get("resources", {}), doc.get("logging", {})
    model = doc.get("model")
    _require(model in models.names(), where, "model", f"one of {', '.join(models.names())}", model)
    _require(isinstance(doc.get("data"), str), where, "data", "a data source such as builtin:digits",
             doc.get("data"))
    method = doc.get("method", "self_distill")
    _require(method in METHODS, where, "method", " | ".join(METHODS), method)
    mask_ratio = doc.get("mask_ratio", 0.75)
    _require(_number(mask_ratio) and 0 < mask_ratio < 1, where, "mask_ratio", "a number in (0, 1)", mask_ratio)
    rounds = sd.get("rounds", 1)
    _require(isinstance(rounds, int) and not isinstance(rounds, bool) and rounds >= 0, where,
             "self_distill.rounds", "an integer >= 0", rounds)
    mae_weight = sd.get("mae_weight", 1.0)
    _require(_number(mae_weight) and mae_weight >= 0, where, "self_distill.mae_weight", "a number >= 0", mae_weight)
    workers = res.get("workers", 1)
    _require(_integer(workers) and workers >= 1, where, "resources.workers", "an integer >= 1", workers)
    use_gpu, keep = res.get("use_gpu", False), log.get("keep_checkpoints", False)
    _require(isinstance(use_gpu, bool), where, "resources.use_gpu", "true or false", use_gpu)
    _require(isinstance(keep, bool), where, "logging.keep_checkpoints", "true or false", keep)
    cpus = res.get("cpus_per_worker", 1)
    _require(_number(cpus) and cpus > 0, where, "resources.cpus_per_worker", "a number > 0", cpus)
    placement = res.get("placement", "pack")
    _require(placement in PLACEMENTS, where, "resources.placement", " | ".join(PLACEMENTS), placement)
    custom = res.get("custom") or {}
    _require(isinstance(custom, dict) and all(isinstance(k, str) and _number(v) and v > 0
                                              for k, v in custom.items()),
             where, "resources.custom", "a mapping of resource name -> amount > 0", custom)
    reserved = {"CPU", "GPU", "memory", "object_store_memory"} & set(custom)
    _require(not reserved, where, "resources.custom", "free of CPU/GPU/memory (they have their own "
             "keys)", custom)
    accelerator = res.get("accelerator_type")
    _require(accelerator is None or (isinstance(accelerator, str) and accelerator), where,
             "resources.accelerator_type", "a GPU type such as A100 or H100", accelerator)
    _require(accelerator is None or use_gpu, where, "resources.accelerator_type",
             "set only with resources.use_gpu: true", accelerator)
    cfg = TrialConfig(
        model=model, weights=str(doc.get("weights", "none")), data=doc["data"], method=method,
        mask_ratio=float(mask_ratio), rounds=rounds, mae_weight=float(mae_weight),
        further_pretrain=_stage(doc, "further_pretrain", where),
        self_distill=_stage(doc, "self_distill", where), finetune=_stage(doc, "finetune", where),
        eval_batch_size=ev.get("batch_size", 256), eval_every=ev.get("every", 0),
        eval_max_examples=ev.get("max_examples", 0), signal=ev.get("signal", "knn"),
        signal_examples=ev.get("signal_examples", 10000),
        teacher_cache=sd.get("teacher_cache", "auto"), val_fraction=ev.get("val_fraction", 0.1),
        finetune_dropout=doc.get("finetune", {}).get("dropout", 0.1),
        finetune_augment=doc.get("finetune", {}).get("augment", "flip"),
        precision=doc.get("precision", "bf16"),
        max_length=doc.get("max_length", 128), seed=doc.get("seed", 0),
        log_every=log.get("log_every", 10), checkpoint_every=log.get("checkpoint_every", 100),
        num_workers=workers, use_gpu=use_gpu, cpus_per_worker=cpus,
        loader_workers=res.get("loader_workers", 0), placement=placement,
        custom_resources=tuple(sorted((k, float(v)) for k, v in custom.items())),
        accelerator_type=accelerator, keep_checkpoints=keep,
    )
    for key, value in (("evaluation.batch_size", cfg.eval_batch_size), ("logging.log_every", cfg.log_every),
                       ("logging.checkpoint_every", cfg.checkpoint_every), ("max_length", cfg.max_length)):
        _require(_integer(value) and value >= 1, where, key, "an integer >= 1", value)
    _require(cfg.signal in SIGNALS, where, "evaluation.signal", " | ".join(SIGNALS), cfg.signal)
    _require(cfg.finetune_augment in AUGMENTS, where, "finetune.augment", " | ".join(AUGMENTS),
             cfg.finetune_augment)
    _require(cfg.precision in PRECISIONS, where, "precision", " | ".join(PRECISIONS), cfg.precision)
    _require(_number(cfg.finetune_dropout) and 0 <= cfg.finetune_dropout < 1, where,
             "finetune.dropout", "a number in [0, 1)", cfg.finetune_dropout)
    _require(_number(cfg.val_fraction) and 0 < cfg.val_fraction < 1, where,
             "evaluation.val_fraction", "a number in (0, 1)", cfg.val_fraction)
    _require(cfg.teacher_cache in TEACHER_CACHE, where, "self_distill.teacher_cache",
             " | ".join(TEACHER_CACHE), cfg.teacher_cache)
    for key, value in (("evaluation.every", cfg.eval_every), ("resources.loader_workers", cfg.loader_workers),
                       ("evaluation.max_examples", cfg.eval_max_examples),
                       ("evaluation.signal_examples", cfg.signal_examples),
                       ("seed", cfg.seed)):
        _require(_integer(value) and value >= 0, where, key, "an integer >= 0", value)
    _require(cfg.eval_every <= cfg.finetune.steps, where, "evaluation.every",
             f"at most finetune.steps = {cfg.finetune.steps} (0: only at the end)", cfg.eval_every)
    for stage in ("further_pretrain", "self_distill", "finetune"):
        batch = getattr(cfg, stage).batch_size
        _require(batch % workers == 0, where, f"{stage}.batch_size",
                 f"divisible by resources.workers={workers} (it is the global batch)", batch)
    return cfg


SMOKE_STEPS = {"further_pretrain": 2, "self_distill": 2, "finetune": 4}


def smoke_overrides(space: Space, use_gpu: bool) -> dict[str, Any]:
    """What `--smoke` changes of a space: only what costs time. The model, weights, data and
    search stay; every stage runs (a searched T' becomes 1); 2 trials on one worker each."""
    cfg = space.trial_config()
    out: dict[str, Any] = {}
    for stage, steps in SMOKE_STEPS.items():
        scfg = getattr(cfg, stage)
        out.update({f"{stage}.steps": steps, f"{stage}.batch_size": min(scfg.batch_size, 2),
                    f"{stage}.warmup_steps": min(scfg.warmup_steps, steps // 2)})
    if models.family(cfg.model) == "roberta":
        out["max_length"] = min(cfg.max_length, 64)
    out.update({"evaluation.every": SMOKE_STEPS["finetune"],
                "evaluation.batch_size": 8, "evaluation.max_examples": 8,
                "logging.log_every": 1, "logging.checkpoint_every": 2,
                "resources.workers": 1, "resources.use_gpu": use_gpu, "resources.cpus_per_worker": 1,
                "resources.loader_workers": 0,
                "resources.custom": {}, "resources.accelerator_type": None,
                "study.num_samples": 2, "study.smoke": True})
    rounds = next((p for p in space.params if p.key == "self_distill.rounds"), None)
    if rounds is not None and rounds.high >= 1:
        out["search.self_distill.rounds"] = {"type": "choice", "choices": [max(1, int(rounds.low))]}
    elif rounds is None and cfg.method == "self_distill":
        out["self_distill.rounds"] = max(cfg.rounds, 1)
    if space.study.scheduler:  # ASHA stays wired; its first rung is the smoke trial's last signal
        stages = {"self_distill": 2, "further_pretrain": 1}.get(cfg.method)
        out["study.scheduler" + (".grace_period" if stages else "")] = stages
    out["evaluation.signal_examples"] = 8
    return out


def current_value(space: Space, dotted: str) -> Any:
    """The value a dotted key has in a loaded space (None where the file leaves it out)."""
    head, _, rest = dotted.partition(".")
    if head == "study":
        study = dataclasses.asdict(space.study)
        return study.get(rest) if "." not in rest else (study.get("scheduler") or {}).get(rest.split(".")[1])
    if head == "search":
        param = next((p for p in space.params if p.key == rest), None)
        return None if param is None else (list(param.choices) if param.type == "choice"
                                           else [param.low, param.high])
    try:
        return _get(space.doc, dotted)
    except (KeyError, TypeError):
        return None


def check_inputs(space: Space) -> None:
    """The weights and data of every trial the space can run, and the space's values against
    its model, checked before Ray starts."""
    from raysd.data import check_source
    from raysd.models.weights import check_weights

    trials = [(space.source, space.trial_config())]
    for param in space.params:
        if param.key in ("model", "weights", "data"):
            values = list(param.choices)
        elif param.key == "max_length":
            values = [max(_extremes(param))]  # the longest text is the one that can overflow
        else:
            continue
        trials += [(f"{space.source}: search.{param.key} = {value!r}",
                    space.trial_config({param.key: value})) for value in values]
    for where, cfg in trials:
        check_weights(cfg.model, cfg.weights)
        check_model_fit(cfg, where)
        batches = [getattr(cfg, stage).batch_size for stage, _ in cfg.stages()]
        check_source(cfg.data, min_train=max(batches), val_fraction=cfg.val_fraction)


def check_model_fit(cfg: TrialConfig, where: str) -> None:
    """A text model against the values it is given: `max_length` within its positions, and
    a tokenizer that fits its vocabulary. A local checkpoint's config and tokenizer are read
    here, as a worker would read them; a hub checkpoint's are checked when a worker downloads
    them; the demo's are built to fit (tests/test_text_demo.py)."""
    if models.family(cfg.model) != "roberta":
        return
    import torch
    from transformers import RobertaConfig

    from raysd.models.roberta import architecture_differences

    with torch.device("meta"):  # shapes and config only: no memory, no init
        backbone = models.build(cfg.model)
    _require(cfg.max_length <= backbone.max_length, where, "max_length",
             f"at most {backbone.max_length}, the positions of {cfg.model}", cfg.max_length)
    if cfg.weights in ("", "none") and backbone.tokenizer is None:
        raise ConfigError(f"{where}: weights: none leaves {cfg.model} without a tokenizer; "
                          "give weights hf:ID or a saved directory")
    local = _local_weights(cfg.weights)
    if local is None:
        return
    if (local / "config.json").is_file():  # a transformers checkpoint (raysd's own: check_weights)
        differ = architecture_differences(RobertaConfig.from_json_file(str(local / "config.json")),
                                          backbone.config)
        if differ:
            raise ConfigError(f"weights {cfg.weights!r}: do not fit {cfg.model} "
                              f"({', '.join(differ)})")
    backbone.load_tokenizer(str(local))  # <pad> id, a <mask>, no more tokens than the vocabulary


def _local_weights(weights: str) -> Path | None:
    """The folder a weights source reads (a directory, or hf:DIR), else None."""
    if weights.startswith("hf:"):
        weights = weights[3:].partition("@")[0]
    elif weights in ("", "none") or weights.startswith(("builtin:", "timm:")):
        return None
    path = Path(weights).expanduser()
    return path if path.is_dir() else None
