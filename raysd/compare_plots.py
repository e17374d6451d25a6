"""Plots of a comparison's trials.parquet rows (raysd compare): its compare.png, and the paper's
Figures 4 and 5, which `raysd report` draws for a comparison. Figures only: callers save them.

Every plot reads completed rows: one dot per seed, the mean as a bar or line, ± one std.
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # no display on cluster heads and CI
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

COLUMNS = ("init_distance", "gen_gap")
ROUNDS = "cfg.self_distill.rounds"
# What varies between a variant's seeds and along a Figure 4 curve; every other value a variant
# sets (param.*) tells its curve apart.
NOT_A_FAMILY = ("param.seed", "param.finetune.seed", "param.self_distill.rounds")


def _test_column(metric: str) -> str:
    return "test_" + metric.split("_", 1)[1]


def _completed(rows: pd.DataFrame) -> pd.DataFrame:
    return rows[rows["status"] == "completed"] if "status" in rows.columns else rows.iloc[0:0]


def _per_variant(ax, done: pd.DataFrame, column: str) -> None:
    """One bar per variant at its mean, ± one std, and a dot per seed."""
    variants = list(dict.fromkeys(done["variant"]))
    for i, variant in enumerate(variants):
        values = done[done["variant"] == variant][column].astype(float)
        ax.bar(i, values.mean(), yerr=values.std(ddof=1) if len(values) > 1 else 0,
               color="#c6dbef", edgecolor="#3182bd", capsize=3)
        ax.scatter([i] * len(values), values, color="#08519c", s=12, zorder=3)
    ax.set_xticks(range(len(variants)), variants, rotation=20, ha="right", fontsize=8)
    ax.set_title(column)


def variant_plot(rows: pd.DataFrame, metric: str) -> plt.Figure:
    """compare.png: the test metric, init_distance and gen_gap per variant."""
    done = _completed(rows)
    fig, axes = plt.subplots(1, 3, figsize=(4 * 3, 3.6), dpi=100)
    for ax, column in zip(axes, (_test_column(metric), *COLUMNS)):
        _per_variant(ax, done, column)
    return fig


def rounds_curves(rows: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Figure 4's curves: label -> the completed rows of variants that differ only in T'
    (the variants `--rounds` makes), when they hold at least two T'."""
    done = _completed(rows)
    if done.empty or ROUNDS not in done.columns or "variant" not in done.columns:
        return {}
    family_columns = sorted(c for c in done.columns if c.startswith("param.") and c not in NOT_A_FAMILY)

    def family(row: pd.Series) -> str:
        present = {c[len("param."):]: row[c] for c in family_columns if pd.notna(row[c])}
        label = str(present.pop("method", row.get("method", "")))
        return ", ".join([label, *(f"{k}={v}" for k, v in present.items())])

    families = done.apply(family, axis=1) if len(done) else pd.Series(dtype=str)
    return {label: group for label, group in done.groupby(families, sort=False)
            if group[ROUNDS].nunique() > 1}


def figure4(rows: pd.DataFrame, metric: str) -> plt.Figure | None:
    """The paper's Figure 4: the test metric against T', one curve per method whose rounds
    varied, with finetune and further_pretrain as horizontal references when they ran; None
    when no rounds varied."""
    curves = rounds_curves(rows)
    if not curves:
        return None
    test, done = _test_column(metric), _completed(rows)
    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    for i, (label, group) in enumerate(curves.items()):
        by_t = group.groupby(ROUNDS)[test]
        means, stds = by_t.mean(), by_t.std(ddof=1).fillna(0)
        ax.errorbar(means.index, means, yerr=stds, marker="o", capsize=3, color=f"C{i}", label=label)
        ax.scatter(group[ROUNDS], group[test], color=f"C{i}", s=10, alpha=0.5)
    for j, reference in enumerate(("finetune", "further_pretrain")):
        values = done.loc[done["variant"] == reference, test].astype(float)
        if len(values):
            ax.axhline(values.mean(), linestyle="--", color=f"C{len(curves) + j}", label=reference)
    ax.set(xlabel="T' (self-distillation rounds)", ylabel=test, title=f"{test} vs T' (Figure 4)")
    ax.set_xticks(sorted(pd.concat(curves.values())[ROUNDS].unique()))
    ax.legend(fontsize="small")
    return fig


def figure5(rows: pd.DataFrame) -> plt.Figure | None:
    """The paper's Figure 5: the generalisation gap (test loss - train loss) and
    ||theta_init - theta_final||_2 after fine-tuning, per variant; None without completed rows."""
    done = _completed(rows)
    if done.empty or not set(COLUMNS) <= set(done.columns):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), dpi=100)
    for ax, column in zip(axes, ("gen_gap", "init_distance")):
        _per_variant(ax, done, column)
    axes[0].set_title("generalisation gap (test loss - train loss)")
    axes[1].set_title(r"$\Vert\theta_{init} - \theta_{final}\Vert_2$ (init_distance)")
    return fig


def paper_figures(rows: pd.DataFrame, metric: str) -> dict[str, plt.Figure]:
    """File name -> figure, for the paper's figures these rows can draw."""
    found = {"figure4_rounds.png": figure4(rows, metric), "figure5_gap_distance.png": figure5(rows)}
    return {name: fig for name, fig in found.items() if fig is not None}
