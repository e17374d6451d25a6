"""Search spaces: YAML -> a validated Space (trial defaults, study settings, searched params).

Everything is checked before Ray starts; a problem is one ConfigError naming file and key.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import importlib.resources
import math
import operator
import re
from pathlib import Path
from typing import Any

import yaml

from raysd import config, schema
from raysd.chain import ROUNDS, Chain
from raysd.schema import is_integer, is_number
from raysd.config import TrialConfig
from raysd.credentials import conceal, redact
from raysd.errors import ConfigError
from raysd.paths import absolute_doc
from raysd.overrides import PARAM_KEYS, SCHEDULER_KEYS, SPACE_KEYS, apply_override, read_yaml

# The repository's search_spaces/ folder, installed as the package raysd.search_spaces.
SPACES_DIR = Path(str(importlib.resources.files("raysd.search_spaces")))
KEEP_MODELS = ("best", "all", "none")
ROUNDS_MODES = ("chain", "param")
LOGGERS = ("mlflow", "wandb")


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
    # How a searched T' runs: chain = each trial trains rounds up to the searched maximum and
    # fine-tunes after every one (chain.py); param = T' sampled like any parameter. None: chain
    # where the space can run as chains (see Space.chain), else param.
    rounds: str | None = None


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

    @functools.cached_property  # read per reported row by the recorder and the console
    def chain(self) -> Chain | None:
        """The chain each trial runs, or None when T' is a sampled parameter (study.rounds)."""
        if self.study.rounds == "param" or chain_refusal(self) is not None:
            return None
        rounds = next(p for p in self.params if p.key == ROUNDS)
        return Chain(tuple(extremes(rounds)), self.study.metric, self.study.mode)

    @property
    def sampled(self) -> tuple[Param, ...]:
        """The parameters the sampler draws: in a chain study, all but T'."""
        return tuple(p for p in self.params if p.key != ROUNDS) if self.chain else self.params

    def active(self, values: dict) -> dict:
        """`values` (no None among them) without the parameters whose `when` does not hold."""
        out: dict = {}
        for param in self.params:
            if param.key in values and param.active({**values, **out}):
                out[param.key] = values[param.key]
        return out

    def trial_config(self, values: dict | None = None) -> TrialConfig:
        """The TrialConfig of the file's defaults with searched `values` (dotted keys) applied."""
        doc = copy.deepcopy(self.doc)
        for key, value in (values or {}).items():
            schema.set_dotted(doc, key, value)
        return trial_config(doc, self.source)


def trial_config(doc: dict, where: str) -> TrialConfig:
    """Validate a resolved space document (each setting by its own rule, then the rules between
    settings) and build the TrialConfig it describes."""
    cfg = schema.parse(TrialConfig, {k: v for k, v in doc.items() if k not in SPACE_KEYS}, where)
    config.check(cfg, where)
    return cfg


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


def load_space(name_or_path: str, overrides: dict[str, Any] | None = None) -> Space:
    path = resolve_path(name_or_path)
    return load_space_text(read_space_file(path), str(path), path.stem, overrides)


def read_space_file(path: Path) -> str:
    """A space file's text; ConfigError when it is not UTF-8."""
    try:
        return path.read_bytes().decode()
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 (byte {err.start}: {err.object[err.start]:#04x})") from None


def load_space_text(text: str, where: str, name: str,
                    overrides: dict[str, Any] | None = None) -> Space:
    """Parse and validate a space; `where` names its source in every error."""
    try:
        doc = read_yaml(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    for key, value in (overrides or {}).items():
        apply_override(doc, key, value)
    absolute_doc(doc)  # before anyone changes directory: a saved space.yaml holds absolute paths
    if not isinstance(doc.get("description", ""), str):
        raise ConfigError(f"{where}: description: must be text")
    search = doc.pop("search", None) or {}
    study = _study(doc.pop("study", None) or {}, where)
    params = _params(search, where)
    space = Space(name, where, doc, study, params)
    space.trial_config()  # defaults must be valid on their own
    for param in params:  # and so must every searched value's extremes
        for value in extremes(param):
            try:
                space.trial_config({param.key: value})
            except ConfigError as err:
                raise ConfigError(f"{where}: search.{param.key}: value {value!r} in its range is "
                                  f"invalid: {str(err).split(': ', 2)[-1]}") from None
    _check_scheduler(space)
    if space.study.rounds == "chain" and chain_refusal(space):
        raise ConfigError(f"{where}: study.rounds: chain needs {chain_refusal(space)}")
    return space


def chain_refusal(space: Space) -> str | None:
    """Why the space's trials cannot run as chains (None: they can)."""
    rounds = next((p for p in space.params if p.key == ROUNDS), None)
    if rounds is None or rounds.type != "int" or rounds.when is not None:
        return "a searched self_distill.rounds of type int, without when"
    if space.trial_config().method != "self_distill" or any(p.key == "method" for p in space.params):
        return "method: self_distill, not searched"
    return None


def pretrain_stages(space: Space) -> tuple[int, int]:
    """(fewest, most) pre-training stages of a trial over the searched range: ASHA's clock."""
    counts = [space.trial_config().pretrain_stages()] + [
        space.trial_config({p.key: v}).pretrain_stages() for p in space.params for v in extremes(p)]
    return min(counts), max(counts)


def _check_scheduler(space: Space) -> None:
    """ASHA needs a signal to act on and a first rung that some trial reaches."""
    sched = space.study.scheduler
    if not sched:
        return
    cfg = space.trial_config()
    chain = space.chain
    if chain is None and cfg.evaluation.signal == "none":
        raise ConfigError(f"{space.source}: study.scheduler: ASHA acts on the early signal; set "
                          "evaluation.signal: knn or remove the scheduler")
    searched = [p.key for p in space.params if p.key.split(".")[-1] in ("steps", "batch_size")
                and p.key.split(".")[0] in ("further_pretrain", "self_distill")]
    if searched:
        raise ConfigError(f"{space.source}: search.{searched[0]}: ASHA compares trials after equal "
                          "work; with a scheduler, pre-training budgets cannot be searched")
    _, most = pretrain_stages(space)
    what = "the most pre-training stages a trial runs"
    if chain is not None:  # rungs after points
        most, what = len(chain.points), "the points of a chain"
    grace = sched.get("grace_period", 1)
    if grace > most:
        raise ConfigError(f"{space.source}: study.scheduler.grace_period: must be at most {most}, "
                          f"{what} (got {grace})")


def extremes(param: Param) -> list:
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
        _require(is_integer(value) and value >= low, where, f"study.{key}", f"an integer >= {low}", value)
    _require(settings.mode in ("max", "min"), where, "study.mode", "max or min", settings.mode)
    _require(isinstance(settings.metric, str) and bool(re.fullmatch(r"(val|train)_\w+", settings.metric)),
             where, "study.metric", "a validation metric such as val_accuracy or val_macro_f1 "
             "(test metrics are recorded, never used to choose)", settings.metric)
    _require(settings.artifacts is None or (isinstance(settings.artifacts, str) and settings.artifacts),
             where, "study.artifacts", "a folder or URI, or none", settings.artifacts)
    storage = settings.optuna_storage
    _require(storage is None or (isinstance(storage, str) and (
        "://" in storage or bool(re.fullmatch(r"env:[A-Za-z_][A-Za-z0-9_]*", storage)))),
             where, "study.optuna_storage", "an RDB URL such as sqlite:///optuna.db, or env:NAME "
             "(the URL is in the environment variable NAME)", redact(str(storage)))
    # The space (and all built from it) holds the URL without its password: credentials.py.
    settings = dataclasses.replace(settings, optuna_storage=conceal(storage))
    _require(settings.rounds is None or settings.rounds in ROUNDS_MODES, where, "study.rounds",
             " | ".join(ROUNDS_MODES), settings.rounds)
    _require(settings.keep_models in KEEP_MODELS, where, "study.keep_models", " | ".join(KEEP_MODELS),
             settings.keep_models)
    _require(settings.loggers is None or (isinstance(settings.loggers, list)
                                          and all(isinstance(x, str) and x in LOGGERS
                                                  for x in settings.loggers)),
             where, "study.loggers", f"a list of {', '.join(LOGGERS)}", settings.loggers)
    sched = settings.scheduler
    if sched is not None:
        _require(isinstance(sched, dict) and sched.get("type") == "asha", where, "study.scheduler.type",
                 "asha", sched.get("type") if isinstance(sched, dict) else sched)
        for key in sched:
            if key not in SCHEDULER_KEYS:
                raise ConfigError(f"{where}: unknown key study.scheduler.{key}")
        for key, low in (("grace_period", 1), ("reduction_factor", 2)):  # ASHA keeps 1/factor per rung
            if sched.get(key) is not None:
                _require(is_integer(sched[key]) and sched[key] >= low, where, f"study.scheduler.{key}",
                         f"an integer >= {low}", sched[key])
    return settings


def _params(search: dict, where: str) -> tuple[Param, ...]:
    if not isinstance(search, dict):
        raise ConfigError(f"{where}: search: expected a mapping of key -> parameter")
    params: list[Param] = []
    for key, spec in search.items():
        at = f"{where}: search.{key}"
        setting = schema.leaf(TrialConfig, key)
        if setting is None:
            raise ConfigError(f"{where}: search: unknown key {key!r}")
        if not setting.searchable:
            raise ConfigError(f"{at}: cannot be searched (it changes how a trial runs, not what "
                              "it computes)")
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
        if step is not None and not (is_number(step) and step > 0):
            raise ConfigError(f"{at}: step must be a number > 0 (got {step!r})")
        param = Param(key, kind, float(low), float(high), log, step, when=when)
        _optuna_accepts(param, at)
        params.append(param)
    return tuple(params)


def _kind(value: Any) -> str | None:
    if isinstance(value, bool):
        return "bool"
    if is_number(value):
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
    match = re.fullmatch(r"\s*([\w.]+)\s*(>=|<=|==|!=|>|<)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*",
                         str(raw))
    if not match:
        raise ConfigError(f"{at}: when must read 'KEY OP NUMBER', e.g. 'self_distill.rounds > 0' (got {raw!r})")
    key, op, value = match.groups()
    if key not in {p.key for p in earlier}:
        raise ConfigError(f"{at}: when refers to {key!r}, which is not a searched parameter above it")
    return key, op, float(value)


def _require(ok: bool, where: str, key: str, what: str, got: Any) -> None:
    if not ok:
        raise ConfigError(f"{where}: {key}: must be {what} (got {got!r})")
