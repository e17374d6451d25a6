"""`--set KEY=VALUE` and `--smoke`: changes to a space file's document before it is validated."""
from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING, Any

import yaml

from raysd import schema
from raysd.config import MODEL_FAMILIES, PLANS, TrialConfig
from raysd.errors import ConfigError

if TYPE_CHECKING:
    from raysd.spaces import Space

# Top-level keys of a space file that are not trial settings.
SPACE_KEYS = ("description", "study", "search")
SCHEDULER_KEYS = {"type", "grace_period", "reduction_factor"}
PARAM_KEYS = {"type", "low", "high", "log", "step", "choices", "when"}


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `3e-4` as a string; researchers write learning rates that way."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def read_yaml(text: str):
    return yaml.load(text, Loader=_Loader)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`--set KEY=VALUE` pairs; VALUE is read as YAML (numbers, booleans, lists)."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        try:
            out[key.strip()] = read_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item!r}: VALUE is not valid YAML "
                              f"({str(err).splitlines()[0]})") from None
    return out


def is_setting(dotted: str) -> bool:
    """A trial setting of the schema (what `--set` and `search:` may name)."""
    return schema.leaf(TrialConfig, dotted) is not None


def _off(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.lower() == "none")


def apply_override(doc: dict, dotted: str, value: Any) -> None:
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
    if not (dotted in ("description", "study") or (head == "study" and rest and "." not in rest)
            or is_setting(dotted) or dotted in schema.sections(TrialConfig)):
        raise ConfigError(f"{where}: unknown key {dotted!r}")
    schema.set_dotted(doc, dotted, value)


SMOKE_STEPS = {"further_pretrain": 2, "self_distill": 2, "finetune": 4}


def smoke_overrides(space: Space, use_gpu: bool) -> dict[str, Any]:
    """What `--smoke` changes of a space: only what costs time. The model, weights, data and
    search stay; every stage runs (a searched T' becomes 1, a chain's points 0 and 1); 2 trials on one worker each."""
    cfg = space.trial_config()
    out: dict[str, Any] = {}
    for stage, steps in SMOKE_STEPS.items():
        scfg = getattr(cfg, stage)
        out.update({f"{stage}.steps": steps, f"{stage}.batch_size": min(scfg.batch_size, 2),
                    f"{stage}.warmup_steps": min(scfg.warmup_steps, steps // 2)})
    if MODEL_FAMILIES[cfg.model] == "roberta":
        out["max_length"] = min(cfg.max_length, 64)
    out.update({"evaluation.every": SMOKE_STEPS["finetune"],
                "evaluation.batch_size": 8, "evaluation.max_examples": 8,
                "logging.log_every": 1, "logging.checkpoint_every": 2,
                "resources.workers": 1, "resources.use_gpu": use_gpu, "resources.cpus_per_worker": 1,
                "resources.loader_workers": 0,
                "resources.custom": {}, "resources.accelerator_type": None,
                "study.num_samples": 2, "study.smoke": True})
    rounds = next((p for p in space.params if p.key == "self_distill.rounds"), None)
    if space.chain is not None:  # a chain of one round: both points, every stage once
        low = min(int(rounds.low), 1)
        out["search.self_distill.rounds"] = {"type": "int", "low": low, "high": low + 1}
    elif rounds is not None and rounds.high >= 1:
        out["search.self_distill.rounds"] = {"type": "choice", "choices": [max(1, int(rounds.low))]}
    elif rounds is None and PLANS[cfg.method] == "self_distill":
        out["self_distill.rounds"] = max(cfg.self_distill.rounds, 1)
    if space.study.scheduler:  # ASHA stays wired; its first rung is the smoke trial's last signal
        stages = {"self_distill": 2, "further_pretrain": 1}.get(PLANS[cfg.method])
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
        return schema.get_dotted(space.doc, dotted)
    except KeyError:
        return None
