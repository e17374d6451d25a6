"""One schema for every setting: nested frozen dataclasses whose fields carry their own rules.

A setting is declared once, with `setting(...)`: its default, the rule a value must meet,
whether a space may search it, and which stage outputs it can change (the artifact-key
declaration). Everything else is derived from those declarations by the functions here:
YAML parsing and validation (`parse`), dotted names (`leaves`, `flatten`), `--set` and
searched values (`with_values`), and the inputs of an artifact key (`key_inputs`).
No Ray, no torch.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterator

from raysd.errors import ConfigError

# The stage outputs a setting can change. Pre-training stages are artifacts shared between
# trials through their keys; "signal" is the early signal stored beside an artifact; fine-tuning
# is never shared, so declaring it documents the setting without entering a key.
OUTPUTS = ("further_pretrain", "self_distill", "signal", "finetune")
PRETRAIN = ("further_pretrain", "self_distill")
EVERYTHING = OUTPUTS
NOTHING: tuple[str, ...] = ()  # declared: cannot change what any stage computes
OWN_STAGE = ("<own stage>",)  # in a stage section's fields: the stage the section configures


@dataclasses.dataclass(frozen=True)
class Rule:
    """What a value must be: `ok` decides, `what` says it in an error, `coerce` normalises."""

    ok: Callable[[Any], bool]
    what: str
    coerce: Callable[[Any], Any] = lambda value: value
    choices: tuple = ()  # all the values there are, where they can be listed


def is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def integer(low: int) -> Rule:
    return Rule(lambda v: is_integer(v) and v >= low, f"an integer >= {low}")


def number(low: float, high: float | None = None, *, low_open: bool = False,
           high_open: bool = True) -> Rule:
    """A float in [low, high) by default; `low_open`/`high_open` say which ends are excluded."""
    def ok(v: Any) -> bool:
        return (is_number(v) and (v > low if low_open else v >= low)
                and (high is None or (v < high if high_open else v <= high)))

    if high is None:
        what = f"a number {'>' if low_open else '>='} {low:g}"
    else:
        what = (f"a number in {'(' if low_open else '['}{low:g}, {high:g}"
                f"{')' if high_open else ']'}")
    return Rule(ok, what, float)


def one_of(*choices: str) -> Rule:
    return Rule(lambda v: v in choices, " | ".join(choices), choices=choices)


BOOLEAN = Rule(lambda v: isinstance(v, bool), "true or false", choices=(False, True))


def text(what: str) -> Rule:
    return Rule(lambda v: isinstance(v, str) and bool(v), what)


def setting(default: Any, rule: Rule, *, changes: tuple[str, ...], searchable: bool = True,
            doc: str = "") -> Any:
    """A dataclass field that declares everything about one setting (see the module doc)."""
    for output in changes:
        if output not in OUTPUTS and changes is not OWN_STAGE:
            raise ValueError(f"unknown stage output {output!r}")
    return dataclasses.field(default=default, metadata={
        "rule": rule, "changes": changes, "searchable": searchable, "doc": doc})


def section(cls: type) -> Any:
    """A field holding a nested section (a YAML mapping) with its own defaults."""
    return dataclasses.field(default_factory=cls, metadata={"section": True})


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One setting under its dotted name, with its declaration."""

    name: str  # dotted, as in YAML, Parquet, TensorBoard and Optuna: "self_distill.rounds"
    field: dataclasses.Field
    section: str  # the top-level section it lives in ("" at the top)

    @property
    def rule(self) -> Rule:
        return self.field.metadata["rule"]

    @property
    def searchable(self) -> bool:
        return self.field.metadata["searchable"]

    @property
    def changes(self) -> tuple[str, ...]:
        changes = self.field.metadata["changes"]
        return (self.section,) if changes is OWN_STAGE else changes


def is_section(field: dataclasses.Field) -> bool:
    return bool(field.metadata.get("section"))


def leaves(cls: type, prefix: str = "") -> Iterator[Leaf]:
    """Every setting of a schema class, nested ones included, in declaration order."""
    for field in dataclasses.fields(cls):
        name = prefix + field.name
        if is_section(field):
            yield from leaves(_section_class(field), name + ".")
        else:
            yield Leaf(name, field, prefix.split(".")[0])


def _section_class(field: dataclasses.Field) -> type:
    """A section's class: its default factory (annotations are strings under
    `from __future__ import annotations`)."""
    return field.default_factory


def leaf(cls: type, name: str) -> Leaf | None:
    return next((item for item in leaves(cls) if item.name == name), None)


def sections(cls: type) -> dict[str, type]:
    return {f.name: _section_class(f) for f in dataclasses.fields(cls) if is_section(f)}


def parse(cls: type, doc: dict, where: str, prefix: str = "") -> Any:
    """Build `cls` from a YAML mapping: unknown keys, wrong shapes and rule breaks are one
    ConfigError naming `where` and the dotted key; omitted keys take their defaults."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    for key in doc:
        if key not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(f"{where}: unknown key {prefix + key!r} (known: {known})")
    values = {}
    for name, field in names.items():
        dotted = prefix + name
        if is_section(field):
            raw = doc.get(name)
            if raw is None:
                raw = {}
            if not isinstance(raw, dict):
                raise ConfigError(f"{where}: {dotted}: expected a mapping (got {raw!r})")
            values[name] = parse(_section_class(field), raw, where, dotted + ".")
            continue
        if name not in doc:
            continue  # the declared default
        value, rule = doc[name], field.metadata["rule"]
        if not rule.ok(value):
            raise ConfigError(f"{where}: {dotted}: must be {rule.what} (got {value!r})")
        values[name] = rule.coerce(value)
    return cls(**values)


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted name: value} of every setting: the `cfg.*` columns and `--smoke`'s diff."""
    out = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if is_section(field):
            out.update(flatten(value, prefix + field.name + "."))
        else:
            out[prefix + field.name] = value
    return out


def to_doc(config: Any) -> dict:
    """The nested YAML mapping a config parses back from."""
    out = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        out[field.name] = to_doc(value) if is_section(field) else value
    return out


def with_values(config: Any, values: dict[str, Any], where: str = "values") -> Any:
    """`config` with dotted settings replaced, each checked against its rule."""
    doc = to_doc(config)
    for name, value in values.items():
        if leaf(type(config), name) is None:
            raise ConfigError(f"{where}: unknown key {name}")
        set_dotted(doc, name, value)
    return parse(type(config), doc, where)


def set_dotted(doc: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        child = doc.get(part)
        if not isinstance(child, dict):
            child = doc[part] = {}
        doc = child
    doc[last] = value


def get_dotted(doc: dict, dotted: str) -> Any:
    """The value at a dotted key of a nested mapping; KeyError where it is absent."""
    for part in dotted.split("."):
        if not isinstance(doc, dict):
            raise KeyError(dotted)
        doc = doc[part]
    return doc


def normalise(value: Any) -> Any:
    """One spelling per value in a key: 0 and 0.0 are the same setting."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, (tuple, list)):
        return [normalise(v) for v in value]
    if isinstance(value, dict):
        return {str(k): normalise(v) for k, v in value.items()}
    return str(value)


def key_inputs(config: Any, output: str, resolved: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every setting declared able to change `output`, by dotted name, normalised.

    `resolved` replaces a setting by what it really means in this run (fp32 for bf16 on a CPU,
    `off` for a teacher cache that `auto` turned off); a value of None drops a setting that
    cannot matter here."""
    resolved = resolved or {}
    flat = flatten(config)
    out = {}
    for item in leaves(type(config)):
        if output not in item.changes:
            continue
        value = resolved.get(item.name, flat[item.name])
        if value is not None:
            out[item.name] = normalise(value)
    return out
