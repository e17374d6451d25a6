"""`raysd compare`: the paper's question on your data - does self-distillation beat further
pre-training and plain fine-tuning by more than seed noise? (Table 1, Figure 5)

Which trials to run (methods x seeds, or a study's top trials x seeds) and the table of their
results, read through study_folder.py; Ray is in study.py. The table has mean ± std over seeds per variant of the val and
test metric, init_distance and gen_gap, and each variant's paired difference (same seed)
against the baseline with a 95 % t-interval.
"""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")  # no display on cluster heads and CI
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from scipy import stats  # noqa: E402

from raysd.config import METHODS  # noqa: E402
from raysd.errors import ConfigError  # noqa: E402
from raysd.report import figure_png  # noqa: E402
from raysd.study_folder import StudyFolder, ranked  # noqa: E402

COLUMNS = ("init_distance", "gen_gap")


def method_variants(methods: list[str], rounds: list[int], seeds: int) -> list[dict]:
    """One trial per (method[, T'], seed): the space's values otherwise."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"--methods {','.join(methods)}: unknown method {unknown[0]!r} "
                          f"(use {', '.join(METHODS)})")
    if seeds < 1:
        raise ConfigError(f"--seeds {seeds}: at least 1")
    variants = []
    for method in methods:
        for t in (rounds if method == "self_distill" and rounds else [None]):
            label = method if t is None else f"{method} T'={t}"
            values = {"method": method, **({"self_distill.rounds": t} if t is not None else {})}
            variants += [{"variant": label, "values": {**values, "seed": s}} for s in range(seeds)]
    return variants


def trial_variants(trials: pd.DataFrame, metric: str, mode: str, top: int, seeds: int) -> list[dict]:
    """A study's `top` completed trials (by the validation metric), each over `seeds` seeds."""
    if seeds < 1:
        raise ConfigError(f"--seeds {seeds}: at least 1")
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
        variants += [{"variant": label, "values": {**params, "seed": s}} for s in range(seeds)]
    return variants


def baseline_of(labels: list[str]) -> str:
    """The variant the others are paired against: finetune, else the first (with --from, the
    study's best trial)."""
    return "finetune" if "finetune" in labels else labels[0]


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def summary_table(rows: pd.DataFrame, metric: str, baseline: str | None) -> pd.DataFrame:
    """Per variant: n, mean ± std of the val/test metric, init_distance, gen_gap; and the mean
    paired difference of the test metric against `baseline` with its 95 % t-interval."""
    test = "test_" + metric.split("_", 1)[1]
    done = rows[rows["status"] == "completed"]
    out = []
    for variant, group in done.groupby("variant", sort=False):
        line = {"variant": variant, "n": len(group)}
        for column in (metric, test, *COLUMNS):
            values = group[column].astype(float)
            line[column] = f"{values.mean():.4f} ± {values.std(ddof=1) if len(values) > 1 else 0:.4f}"
        if baseline is not None:
            line[f"{test} - {baseline}"] = ("(baseline)" if variant == baseline
                                            else _paired(done, variant, baseline, test))
        out.append(line)
    return pd.DataFrame(out)


def _paired(done: pd.DataFrame, variant: str, baseline: str, column: str) -> str:
    """Mean difference over the seeds both ran, with a 95 % t-interval."""
    a = done[done["variant"] == variant].set_index("seed")[column]
    b = done[done["variant"] == baseline].set_index("seed")[column]
    diff = (a - b).dropna().astype(float)
    if len(diff) < 2:
        return f"{diff.mean():+.4f} (n={len(diff)})" if len(diff) else "n/a"
    half = stats.t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / math.sqrt(len(diff))
    return f"{diff.mean():+.4f} [{diff.mean() - half:+.4f}, {diff.mean() + half:+.4f}]"


def plot(rows: pd.DataFrame, metric: str) -> plt.Figure:
    """The test metric, init_distance and gen_gap per variant: every seed a dot, mean a bar."""
    test = "test_" + metric.split("_", 1)[1]
    done = rows[rows["status"] == "completed"]
    variants = list(dict.fromkeys(done["variant"]))
    fig, axes = plt.subplots(1, 3, figsize=(4 * 3, 3.6), dpi=100)
    for ax, column in zip(axes, (test, *COLUMNS)):
        for i, variant in enumerate(variants):
            values = done[done["variant"] == variant][column].astype(float)
            ax.bar(i, values.mean(), color="#c6dbef", edgecolor="#3182bd")
            ax.scatter([i] * len(values), values, color="#08519c", s=12, zorder=3)
        ax.set_xticks(range(len(variants)), variants, rotation=20, ha="right", fontsize=8)
        ax.set_title(column)
    return fig


def write_table(study_uri: str, metric: str, labels: list[str]) -> str | None:
    """results/compare.txt and compare.png of a comparison's trials; the table's text, or None
    when no trial of it has ended."""
    folder = StudyFolder(study_uri)
    rows = folder.trials()
    if rows.empty or "variant" not in rows.columns:
        return None
    baseline = baseline_of(labels)
    table = summary_table(rows, metric, baseline)
    text = (f"{metric} over seeds (mean ± std); paired differences against {baseline} "
            "(same seed) with a 95 % t-interval\n" + table.to_string(index=False) + "\n")
    folder.store.write_text(text, "results", "compare.txt")
    folder.store.write_bytes(figure_png(plot(rows, metric)), "results", "compare.png")
    return text
