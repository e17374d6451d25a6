"""`raysd compare`: the paper's questions on your data - does self-distillation beat further
pre-training and plain fine-tuning by more than seed noise? (Tables 1-3, Figures 4 and 5)

Which trials to run (methods x seeds, or a study's top trials x seeds, under a protocol) and the
table of their results, read through study_folder.py; Ray is in study.py. The table has mean ±
std over seeds per variant of the val and test metric, init_distance and gen_gap, and paired
differences (same seed) of the test metric with a 95 % t-interval: every variant against the
baseline, and self_distill against further_pretrain when both ran.

Two protocols, which make ± mean different things:
- full: every stage runs once per seed (`seed`), so the spread includes pre-training's;
- reference: what the reference code did - pre-training has one seed (the first seed), so
  its stages are built once and shared through the artifact store, and only fine-tuning
  repeats over seeds (`finetune.seed`): the spread is fine-tuning's alone. A comparison's
  protocol is what its variants set (study.yaml).
"""
from __future__ import annotations

import math

import pandas as pd
from scipy import stats

from raysd.compare_plots import variant_plot
from raysd.config import METHODS
from raysd.errors import ConfigError
from raysd.report import figure_png
from raysd.study_folder import StudyFolder, ranked

COLUMNS = ("init_distance", "gen_gap")
PROTOCOLS = ("full", "reference")
DEFAULT_METHODS = ("finetune", "further_pretrain", "self_distill")  # the paper's Table 1
# The paper's key contrast: self-distillation minus further pre-training (its only difference
# is the distillation rounds), paired like every variant against the baseline.
CONTRAST = ("self_distill", "further_pretrain")
PROTOCOL_LINES = {
    "full": "protocol full: every stage ran once per seed; ± and intervals include "
            "pre-training's randomness",
    "reference": "protocol reference: one pre-training seed, fine-tuning repeated over seeds "
                 "(finetune.seed), as the reference code did; ± and intervals are fine-tuning's "
                 "randomness alone",
}


def seed_values(seeds: int, first_seed: int, protocol: str) -> list[dict]:
    """The seed settings of a variant's trials: full varies `seed` (every stage), reference
    keeps `seed` (pre-training) at `first_seed` and varies `finetune.seed`."""
    if seeds < 1:
        raise ConfigError(f"--seeds {seeds}: at least 1")
    if first_seed < 0:
        raise ConfigError(f"--first-seed {first_seed}: must be >= 0")
    if protocol not in PROTOCOLS:
        raise ConfigError(f"--protocol {protocol}: use {' or '.join(PROTOCOLS)}")
    if protocol == "reference":
        return [{"seed": first_seed, "finetune.seed": first_seed + i} for i in range(seeds)]
    return [{"seed": first_seed + i} for i in range(seeds)]


def parse_rounds(text: str | None) -> list[int]:
    """--rounds 1,2 -> [1, 2]."""
    try:
        rounds = [int(r) for r in text.split(",")] if text else []
    except ValueError:
        rounds = [-1]
    if any(r < 0 for r in rounds):
        raise ConfigError(f"--rounds {text!r}: expected comma-separated integers >= 0, e.g. 1,2")
    return rounds


def method_variants(methods: list[str], rounds: list[int], seeds: int, protocol: str = "full",
                    first_seed: int = 0) -> list[dict]:
    """One trial per (method[, T'], seed): the space's values otherwise. `rounds` varies
    self_distill's T' (the paper's Figure 4)."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"--methods {','.join(methods)}: unknown method {unknown[0]!r} "
                          f"(use {', '.join(METHODS)})")
    per_seed = seed_values(seeds, first_seed, protocol)
    variants = []
    for method in methods:
        for t in (rounds if method == "self_distill" and rounds else [None]):
            label = method if t is None else f"{method} T'={t}"
            values = {"method": method, **({"self_distill.rounds": t} if t is not None else {})}
            variants += [{"variant": label, "values": {**values, **s}} for s in per_seed]
    return variants


def trial_variants(trials: pd.DataFrame, metric: str, mode: str, top: int, seeds: int,
                   protocol: str = "full", first_seed: int = 0) -> list[dict]:
    """A study's `top` completed trials (by the validation metric), each over `seeds` seeds."""
    per_seed = seed_values(seeds, first_seed, protocol)
    done = ranked(trials, metric, mode)
    if done.empty:
        raise ConfigError(f"the study has no completed trial with {metric}")
    best = done.head(top)
    variants = []
    for _, row in best.iterrows():
        params = {k[len("param."):]: v for k, v in row.items()
                  if k.startswith("param.") and not _missing(v)}
        params = {k: int(v) if float(v).is_integer() and k.endswith(("rounds", "steps", "seed")) else v
                  for k, v in params.items()}
        # A chain study's row is one point of a chain: ID@T' names it.
        label = row["trial_id"] if _missing(row.get("best_point")) else \
            f"{row['trial_id']}@{int(row['cfg.self_distill.rounds'])}"
        variants += [{"variant": label, "values": {**params, **s}} for s in per_seed]
    return variants


def protocol_of(variants: list[dict] | None) -> str:
    """reference when the variants set the fine-tuning seed, else full."""
    return "reference" if any("finetune.seed" in v["values"] for v in variants or ()) else "full"


def pair_column(protocol: str) -> str:
    """The column whose value pairs two variants' trials: the seed that varies."""
    return "cfg.finetune.seed" if protocol == "reference" else "seed"


def baseline_of(labels: list[str]) -> str:
    """The variant the others are paired against: finetune, else the first (with --from, the
    study's best trial)."""
    return "finetune" if "finetune" in labels else labels[0]


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def summary_table(rows: pd.DataFrame, metric: str, baseline: str | None,
                  pair_on: str = "seed") -> pd.DataFrame:
    """Per variant: n, mean ± std of the val/test metric, init_distance, gen_gap; the mean
    paired difference (same `pair_on`) of the test metric against `baseline` with its 95 %
    t-interval; and self_distill's rows against further_pretrain when both ran."""
    test = "test_" + metric.split("_", 1)[1]
    done = rows[rows["status"] == "completed"]
    against = {}  # column -> (the variant compared against, the variants compared)
    labels = list(dict.fromkeys(done["variant"]))
    if baseline is not None:
        against[f"{test} - {baseline}"] = (baseline, set(labels))
    distilled, pretrained = CONTRAST
    if pretrained in labels and "method" in done.columns:
        contrasted = set(done.loc[done["method"] == distilled, "variant"])
        if contrasted and pretrained != baseline:
            against[f"{test} - {pretrained}"] = (pretrained, contrasted)
    out = []
    for variant, group in done.groupby("variant", sort=False):
        line = {"variant": variant, "n": len(group)}
        for column in (metric, test, *COLUMNS):
            values = group[column].astype(float)
            line[column] = f"{values.mean():.4f} ± {values.std(ddof=1) if len(values) > 1 else 0:.4f}"
        for column, (base, compared) in against.items():
            line[column] = ("(baseline)" if variant == base else
                            _paired(done, variant, base, test, pair_on) if variant in compared else "")
        out.append(line)
    return pd.DataFrame(out)


def _paired(done: pd.DataFrame, variant: str, baseline: str, column: str, pair_on: str) -> str:
    """Mean difference over the seeds both ran, with a 95 % t-interval."""
    a = done[done["variant"] == variant].set_index(pair_on)[column]
    b = done[done["variant"] == baseline].set_index(pair_on)[column]
    diff = (a - b).dropna().astype(float)
    if len(diff) < 2:
        return f"{diff.mean():+.4f} (n={len(diff)})" if len(diff) else "n/a"
    half = stats.t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / math.sqrt(len(diff))
    return f"{diff.mean():+.4f} [{diff.mean() - half:+.4f}, {diff.mean() + half:+.4f}]"


def table_text(rows: pd.DataFrame, metric: str, labels: list[str], protocol: str) -> str:
    """compare.txt: what the numbers are, the protocol that made them, and the table."""
    baseline = baseline_of(labels)
    table = summary_table(rows, metric, baseline, pair_column(protocol))
    distilled, pretrained = CONTRAST
    contrasted = pretrained != baseline and any(c.endswith(f" - {pretrained}") for c in table.columns)
    head = (f"{metric} over seeds (mean ± std); paired differences against {baseline}"
            + (f", and {distilled} against {pretrained}" if contrasted else "")
            + " (same seed, with a 95 % t-interval)")
    return f"{head}\n{PROTOCOL_LINES[protocol]}\n{table.to_string(index=False)}\n"


def write_table(study_uri: str, metric: str, labels: list[str] | None = None) -> str | None:
    """results/compare.txt and compare.png of a comparison's trials; the table's text, or None
    when no trial of it has ended. Labels and protocol default to the study's own."""
    folder = StudyFolder(study_uri)
    rows = folder.trials()
    if rows.empty or "variant" not in rows.columns:
        return None
    labels = labels or folder.compare_variants() or list(dict.fromkeys(rows["variant"]))
    text = table_text(rows, metric, labels, protocol_of(folder.about().get("variants")))
    folder.store.write_text(text, "results", "compare.txt")
    folder.store.write_bytes(figure_png(variant_plot(rows, metric)), "results", "compare.png")
    return text
