"""The one schema: every setting declares its rule, whether it is searched and which stage
outputs it can change; parsing, `--set`, columns and artifact keys all follow from it."""
import dataclasses
import json

import pytest

from raysd import config, schema
from raysd.config import TrialConfig
from raysd.errors import ConfigError
from raysd.spaces import available, load_space


def _walk(cls, prefix=""):
    """Every dataclass field under TrialConfig, by raw dataclasses (not schema.leaves), so a
    field added without `setting(...)` is found too."""
    for field in dataclasses.fields(cls):
        name = prefix + field.name
        if field.metadata.get("section"):
            yield from _walk(field.default_factory, name + ".")
        else:
            yield name, field


def _undeclared(cls) -> list[str]:
    out = []
    for name, field in _walk(cls):
        meta = field.metadata
        if not {"rule", "changes", "searchable"} <= set(meta):
            out.append(name)
            continue
        changes = (name.split(".")[0],) if meta["changes"] is schema.OWN_STAGE else meta["changes"]
        assert set(changes) <= set(schema.OUTPUTS), (name, changes)
    return out


def test_every_setting_declares_what_it_can_change():
    undeclared = _undeclared(TrialConfig)
    assert not undeclared, f"settings without a declaration (use schema.setting): {undeclared}"
    assert [leaf.name for leaf in schema.leaves(TrialConfig)] == [n for n, _ in _walk(TrialConfig)]


def test_a_field_without_a_declaration_is_found():
    @dataclasses.dataclass(frozen=True)
    class Logging(config.LoggingConfig):
        new_knob: float = 0.5

    @dataclasses.dataclass(frozen=True)
    class Sneaky(TrialConfig):
        logging: Logging = schema.section(Logging)

    assert _undeclared(Sneaky) == ["logging.new_knob"]


def test_every_default_meets_its_own_rule():
    for leaf in schema.leaves(TrialConfig):
        default = leaf.field.default
        if leaf.name in ("model", "data"):  # the two settings a space must give
            assert not leaf.rule.ok(default)
            continue
        assert leaf.rule.ok(default), (leaf.name, default)


def _other(leaf, value):
    """A valid value other than `value` for a setting."""
    if value is None:  # an optional setting: the first value of a kind its rule takes
        return next(v for v in ("A100", 3) if leaf.rule.ok(v))
    if isinstance(value, tuple):
        return {"a100": 1.0}
    if leaf.rule.choices:
        return next(c for c in leaf.rule.choices if c != value)
    if leaf.name == "model":
        return "vit_small"
    if isinstance(value, str):
        return value + "-other"
    if isinstance(value, int):
        return value + 2
    if isinstance(value, float):
        return value / 2 if value else 0.5
    raise AssertionError(f"no other value for {leaf.name}")


@pytest.mark.parametrize("output", ["further_pretrain", "self_distill", "signal"])
def test_key_inputs_follow_the_declarations_exactly(output):
    """Changing a setting changes an output's key inputs exactly when it declares that output."""
    from conftest import tiny_config

    base = tiny_config()
    flat = schema.flatten(base)
    for leaf in schema.leaves(TrialConfig):
        changed = schema.with_values(base, {leaf.name: _other(leaf, flat[leaf.name])})
        assert schema.flatten(changed)[leaf.name] != flat[leaf.name], leaf.name
        differs = schema.key_inputs(changed, output) != schema.key_inputs(base, output)
        assert differs == (output in leaf.changes), (leaf.name, output)


def test_val_fraction_changes_every_stage_and_numbers_key_alike():
    from conftest import tiny_config

    for output in ("further_pretrain", "self_distill", "signal"):
        assert "evaluation.val_fraction" in schema.key_inputs(tiny_config(), output)
    spelled = [json.dumps(schema.normalise(v)) for v in (0, 0.0, [1, 2.0], {"a": 3})]
    assert spelled == ["0.0", "0.0", "[1.0, 2.0]", '{"a": 3.0}'] and schema.normalise(True) is True
    resolved = schema.key_inputs(tiny_config(), "self_distill", {"evaluation.batch_size": None})
    assert "evaluation.batch_size" not in resolved


def test_columns_and_parquet_names_are_the_yaml_names():
    space = load_space("demo")
    cfg = space.trial_config({"self_distill.rounds": 2})
    columns = config.columns(cfg)
    assert columns["cfg.self_distill.rounds"] == 2 and columns["cfg.resources.workers"] == 1
    assert set(columns) == {f"cfg.{leaf.name}" for leaf in schema.leaves(TrialConfig)}
    for param in space.params:  # every searched key is a setting under the same name
        assert f"cfg.{param.key}" in columns
    assert set(config.LEGACY_COLUMNS.values()) <= set(columns)


def test_parse_names_the_dotted_key_and_rule():
    with pytest.raises(ConfigError, match=r"^here: self_distill.rounds: must be an integer >= 0 "):
        schema.parse(TrialConfig, {"model": "vit_tiny", "data": "d", "self_distill": {"rounds": -1}},
                     "here")
    with pytest.raises(ConfigError, match=r"^here: unknown key 'finetune.rounds' "):
        schema.parse(TrialConfig, {"model": "vit_tiny", "data": "d", "finetune": {"rounds": 1}},
                     "here")
    with pytest.raises(ConfigError, match=r"^here: evaluation: expected a mapping"):
        schema.parse(TrialConfig, {"model": "vit_tiny", "data": "d", "evaluation": 3}, "here")
    cfg = schema.parse(TrialConfig, {"model": "vit_tiny", "data": "d",
                                     "self_distill": {"mae_weight": 1}}, "here")
    assert isinstance(cfg.self_distill.mae_weight, float)  # 1 and 1.0 are one setting


def test_a_setting_that_cannot_be_searched_says_so(tmp_path):
    text = available()["demo"].read_text()
    path = tmp_path / "s.yaml"
    path.write_text(text[: text.index("search:")] + "search:\n  logging.log_every: {type: int, low: 1, high: 3}\n")
    with pytest.raises(ConfigError, match="search.logging.log_every: cannot be searched"):
        load_space(str(path))


def test_every_shipped_space_round_trips_through_the_schema():
    for name in available():
        cfg = load_space(name).trial_config()
        assert schema.parse(TrialConfig, schema.to_doc(cfg), name) == cfg
