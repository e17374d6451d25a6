"""`raysd report`: tables and plots of a study from its trials.parquet and history.parquet.

Trials are ranked by the study's validation metric only; test metrics are shown, never used to choose.
"""
from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # no display on cluster heads and CI
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from raysd.errors import ConfigError  # noqa: E402
from raysd.results import HISTORY, TRIALS, Store  # noqa: E402
from raysd.spaces import Param, Space  # noqa: E402

STATUSES = ("completed", "stopped", "failed")
FIGSIZE, DPI = (5, 4), 100
QUANTILE_BINS = 3


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _test_column(metric: str) -> str:
    """The test counterpart of a validation metric: val_accuracy -> test_accuracy."""
    return "test_" + metric.split("_", 1)[1]


def ranked(trials: pd.DataFrame, metric: str, mode: str) -> pd.DataFrame:
    """Completed trials with a value of `metric`, best first (ties keep completion order)."""
    if metric not in trials.columns:
        return trials.iloc[0:0]
    done = trials[(trials["status"] == "completed") & trials[metric].notna()]
    return done.sort_values(metric, ascending=mode == "min", kind="stable")


def top_table(done: pd.DataFrame, space: Space, top: int) -> pd.DataFrame:
    """trial id, searched params, validation and test metric, wall seconds of the best `top`."""
    metric = space.study.metric
    cols = ["trial_id", *(f"param.{p.key}" for p in space.params), metric, _test_column(metric),
            "wall_seconds"]
    table = done.head(top)[[c for c in cols if c in done.columns]]
    return table.rename(columns=lambda c: c.removeprefix("param.")).reset_index(drop=True)


def param_effect(done: pd.DataFrame, param: Param, metric: str, mode: str) -> pd.DataFrame:
    """best / mean / count of `metric` per value (int, choice) or per quantile bin (float).

    Trials where the parameter was not sampled (its `when` was false) form an "n/a" row."""
    column = done[f"param.{param.key}"] if f"param.{param.key}" in done.columns else None
    if column is None or done.empty:
        return pd.DataFrame(columns=["best", "mean", "count"])
    values = column.dropna()
    if param.type == "float" and values.nunique() > 1:
        groups = pd.qcut(values, min(QUANTILE_BINS, values.nunique()), duplicates="drop").astype(str)
    elif param.type == "int":
        groups = values.astype("int64")
    else:
        groups = values
    scores = done.loc[values.index, metric]
    grouped = scores.groupby(groups, sort=True)
    effect = pd.DataFrame({"best": grouped.max() if mode == "max" else grouped.min(),
                           "mean": grouped.mean(), "count": grouped.size()})
    missing = done.loc[column.isna(), metric]
    if len(missing):
        best = missing.max() if mode == "max" else missing.min()
        effect.loc["n/a"] = [best, missing.mean(), len(missing)]
    effect["count"] = effect["count"].astype(int)
    effect.index.name = param.key
    return effect


def figure_png(fig) -> bytes:
    """A figure as PNG bytes, for any of the study's filesystems (local or s3://)."""
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    return buf.getvalue()


def _save(fig, store: Store, name: str, study_uri: str) -> str:
    """Write a figure under <study>/results/report/, return its address."""
    store.write_bytes(figure_png(fig), "results", "report", name)
    return f"{study_uri.rstrip('/')}/results/report/{name}"


def plot_params(done: pd.DataFrame, space: Space, store: Store, study_uri: str) -> list[str]:
    metric, paths = space.study.metric, []
    for param in space.params:
        column = f"param.{param.key}"
        if column not in done.columns or done[column].isna().all():
            continue
        fig, ax = plt.subplots(figsize=FIGSIZE)
        sampled = done[done[column].notna()]
        x = sampled[column].astype(str) if param.type == "choice" else sampled[column]
        ax.scatter(x, sampled[metric], alpha=0.8)
        if param.log:
            ax.set_xscale("log")
        ax.set(xlabel=param.key, ylabel=metric, title=f"{metric} vs {param.key}")
        paths.append(_save(fig, store, f"param_{param.key}.png", study_uri))
    return paths


def plot_history(trials: pd.DataFrame, done: pd.DataFrame, space: Space, store: Store,
                 study_uri: str) -> str:
    """Metric per completed trial in completion order, and the best so far."""
    metric, mode = space.study.metric, space.study.mode
    ordered = done.sort_index()  # index = position in trials.parquet = completion order
    order = ordered.index + 1
    best = ordered[metric].cummax() if mode == "max" else ordered[metric].cummin()
    fig, ax = plt.subplots(figsize=FIGSIZE)
    ax.scatter(order, ordered[metric], alpha=0.8, label="trial")
    ax.step(order, best, where="post", color="C1", label="best so far")
    ax.set(xlabel=f"trial (completion order, of {len(trials)})", ylabel=metric,
           title="optimisation history")
    ax.legend()
    return _save(fig, store, "history.png", study_uri)


def plot_finetune(history: pd.DataFrame, metric: str, store: Store, study_uri: str) -> str | None:
    """Validation metric during fine-tuning, one line per trial; None without such rows."""
    if history.empty or metric not in history.columns or "stage" not in history.columns:
        return None
    rows = history[(history["stage"] == "finetune") & history[metric].notna()]
    if rows.empty:
        return None
    fig, ax = plt.subplots(figsize=FIGSIZE)
    for tid, curve in rows.groupby("trial_id", sort=False):
        ax.plot(curve["step"], curve[metric], marker=".", label=str(tid))
    if rows["trial_id"].nunique() <= 10:
        ax.legend(fontsize="small")
    ax.set(xlabel="fine-tuning step", ylabel=metric, title=f"fine-tuning {metric}")
    return _save(fig, store, "finetune_curves.png", study_uri)


def write_report(study_uri: str, top: int = 5) -> str:
    """The report's text; writes PNGs to <study>/results/report/ and lists them in the text."""
    from raysd.study import load_study_space  # imports Ray: only once the CLI has parsed flags

    space = load_study_space(study_uri)  # ConfigError when the folder is not a study
    store = Store(study_uri)
    trials = pd.DataFrame(store.read_rows("results", TRIALS))
    history = pd.DataFrame(store.read_rows("results", HISTORY))
    if not trials.empty and "status" not in trials.columns:
        raise ConfigError(f"{study_uri}: results/{TRIALS} has no status column (not written by raysd)")
    metric, mode = space.study.metric, space.study.mode
    counts = {s: int((trials["status"] == s).sum()) if len(trials) else 0 for s in STATUSES}
    name = study_uri.rstrip("/").rsplit("/", 1)[-1]
    lines = [f"study {name} ({study_uri})",
             f"trials: {len(trials)} ({', '.join(f'{n} {s}' for s, n in counts.items())})",
             f"ranked by {metric} ({mode}); test metrics are shown, never used to choose"]
    done = ranked(trials, metric, mode)
    if done.empty:
        lines.append(f"\nno completed trial with {metric}: nothing to rank or plot")
    else:
        lines += [f"\ntop {min(top, len(done))} of {len(done)} completed trials:",
                  top_table(done, space, top).to_string(index=False, float_format=_fmt, na_rep="-")]
        for param in space.params:
            effect = param_effect(done, param, metric, mode)
            kind = "quantile bin" if param.type == "float" else "value"
            lines += [f"\neffect of {param.key} (per {kind}):", effect.to_string(float_format=_fmt)]
    if counts["failed"]:
        failed = trials[trials["status"] == "failed"]
        lines.append("\nfailed trials:")
        lines += [f"  {r.trial_id}: {r.error if pd.notna(r.error) else 'failed (no error message)'}"
                  for r in failed.itertuples()]
    plots = []
    if not done.empty:
        plots = [*plot_params(done, space, store, study_uri),
                 plot_history(trials, done, space, store, study_uri)]
        curves = plot_finetune(history, metric, store, study_uri)
        plots += [curves] if curves else []
    if plots:
        lines += ["\nplots:", *(f"  {p}" for p in plots)]
    return "\n".join(lines)
