"""`raysd report` and `raysd ls`: tables and plots of studies, read through study_folder.py.

Trials are ranked by the study's validation metric only (study_folder.ranked); test metrics are
shown, never used to choose.
"""
from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # no display on cluster heads and CI
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from raysd.chain import ROUNDS  # noqa: E402
from raysd.compare_plots import paper_figures  # noqa: E402
from raysd.errors import ConfigError  # noqa: E402
from raysd.spaces import Param, Space  # noqa: E402
from raysd.storage import Store  # noqa: E402
from raysd.study_folder import StudyFolder, ranked, status_counts  # noqa: E402

FIGSIZE, DPI = (5, 4), 100
QUANTILE_BINS = 3


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _test_column(metric: str) -> str:
    """The test counterpart of a validation metric: val_accuracy -> test_accuracy."""
    return "test_" + metric.split("_", 1)[1]


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


def importances(study_uri: str, space: Space) -> pd.Series | None:
    """Optuna's fANOVA importance of each parameter sampled in every completed trial, from the
    study's Optuna storage; None when there is none or too few trials to tell."""
    import optuna

    from raysd import optuna_study

    study = optuna_study.load(study_uri, space.study.optuna_storage)
    if study is None:
        return None
    try:
        found = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
    except (RuntimeError, ValueError):  # fewer than two completed trials, or nothing varies
        return None
    return pd.Series(found, name="importance", dtype=float)


def plot_gamma_lambda(done: pd.DataFrame, space: Space, store: Store, study_uri: str) -> str | None:
    """The joint view of the masking ratio and the MAE weight: one panel per T', colour = metric."""
    gamma, lam, rounds = "param.mask_ratio", "param.self_distill.mae_weight", "cfg.self_distill.rounds"
    if gamma not in done.columns or lam not in done.columns or done[lam].isna().all():
        return None
    sampled = done[done[lam].notna()]
    panels = sorted(sampled[rounds].unique()) if rounds in sampled.columns else [None]
    metric = space.study.metric
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels) + 1, 4), squeeze=False)
    low, high = sampled[metric].min(), sampled[metric].max()
    for ax, t in zip(axes[0], panels):
        rows = sampled if t is None else sampled[sampled[rounds] == t]
        points = ax.scatter(rows[gamma], rows[lam], c=rows[metric], vmin=low, vmax=high, cmap="viridis", s=60)
        ax.set(xlabel="gamma (mask_ratio)", ylabel="lambda (mae_weight)", title=f"T' = {t}")
    fig.colorbar(points, ax=axes[0, -1], label=metric)
    return _save(fig, store, "gamma_lambda.png", study_uri)


def early_signal(done: pd.DataFrame, metric: str) -> pd.Series:
    """Each trial's k-NN signal after its last pre-training stage (NaN where none was reported)."""
    columns = [c for c in done.columns if c.startswith("knn_accuracy_")]
    order = sorted(columns, key=lambda c: (c != "knn_accuracy_further_pretrain",
                                           int(c.rsplit("_", 1)[1]) if c[-1].isdigit() else 0))
    if not order:
        return pd.Series(dtype=float)
    return done[order].ffill(axis=1).iloc[:, -1].astype(float)


def plot_signal(done: pd.DataFrame, signal: pd.Series, metric: str, store: Store,
                study_uri: str) -> str:
    fig, ax = plt.subplots(figsize=FIGSIZE)
    ax.scatter(signal, done.loc[signal.index, metric], alpha=0.8)
    ax.set(xlabel="k-NN accuracy after the last pre-training stage", ylabel=metric,
           title="early signal vs final metric")
    return _save(fig, store, "early_signal.png", study_uri)


def chain_table(done: pd.DataFrame, space: Space) -> pd.DataFrame:
    """A chain study's trial table: per chain, its sampled params, its argmax T' on validation
    and that point's validation and test metric."""
    metric, rounds = space.study.metric, f"param.{ROUNDS}"
    best = done[done["best_point"].fillna(False).astype(bool)] if "best_point" in done else done.iloc[:0]
    cols = ["trial_id", *(f"param.{p.key}" for p in space.sampled), rounds, metric, _test_column(metric)]
    table = best[[c for c in cols if c in best.columns]].rename(columns={rounds: "argmax T'"})
    return table.rename(columns=lambda c: c.removeprefix("param."))


def plot_chains(done: pd.DataFrame, space: Space, store: Store, study_uri: str) -> str | None:
    """The paper's Figure 4 for a chain study: validation and test metric vs T', one line per
    chain ((gamma, lambda, ...) in the legend), each chain's best point on validation marked."""
    metric, rounds = space.study.metric, f"param.{ROUNDS}"
    if rounds not in done.columns or done.empty:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(FIGSIZE[0] * 2, FIGSIZE[1]), sharex=True)
    for i, (tid, chain) in enumerate(done.sort_values(rounds).groupby("trial_id", sort=True)):
        label = ", ".join(f"{p.key.split('.')[-1]}={_fmt(chain[f'param.{p.key}'].dropna().iloc[0])}"
                          for p in space.sampled if chain[f"param.{p.key}"].notna().any())
        best = chain[chain["best_point"].fillna(False).astype(bool)] if "best_point" in chain else chain.iloc[:0]
        for ax, column in zip(axes, (metric, _test_column(metric))):
            if column not in chain.columns:
                continue
            ax.plot(chain[rounds], chain[column], marker="o", color=f"C{i % 10}", label=f"{tid}: {label}")
            ax.scatter(best[rounds], best[column], marker="*", s=200, color=f"C{i % 10}", zorder=3)
    for ax, column in zip(axes, (metric, _test_column(metric))):
        ax.set(xlabel="T' (rounds of self-distillation)", ylabel=column, title=f"{column} vs T'")
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0].legend(fontsize="small", title="* best point on validation")
    return _save(fig, store, "rounds.png", study_uri)


def write_report(study_uri: str, top: int = 5) -> str:
    """The report's text; writes PNGs to <study>/results/report/ and lists them in the text."""
    folder = StudyFolder(study_uri)
    space = folder.space()  # ConfigError when the folder is not a study
    store, trials, history = folder.store, folder.trials(), folder.history()
    metric, mode = space.study.metric, space.study.mode
    counts = status_counts(trials)
    lines = [f"study {folder.name} ({study_uri})",
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
        if space.chain is not None:
            lines += [f"\nchains ({len(set(done.trial_id))}), each at its best point on {metric}:",
                      chain_table(done, space).to_string(index=False, float_format=_fmt, na_rep="-")]
        found = importances(study_uri, space)
        if found is not None and len(found):
            lines += ["\nparameter importances (Optuna fANOVA; parameters sampled in every trial):",
                      found.to_string(float_format=_fmt)]
        signal = early_signal(done, metric).dropna()
        if len(signal) >= 3 and signal.nunique() > 1 and done.loc[signal.index, metric].nunique() > 1:
            from scipy.stats import spearmanr

            rho = spearmanr(signal, done.loc[signal.index, metric]).statistic
            lines.append(f"\nearly signal (k-NN after the last pre-training stage) vs {metric}: "
                         f"Spearman {rho:+.2f} over {len(signal)} trials")
    if counts["failed"]:
        failed = trials[trials["status"] == "failed"]
        lines.append("\nfailed trials:")
        lines += [f"  {r.trial_id}: {r.error if pd.notna(r.error) else 'failed (no error message)'}"
                  for r in failed.itertuples()]
    plots = []
    if not done.empty:
        plots = [*plot_params(done, space, store, study_uri),
                 plot_history(trials, done, space, store, study_uri)]
        figure4 = plot_chains(done, space, store, study_uri) if space.chain is not None else None
        plots += [figure4] if figure4 else []
        joint = plot_gamma_lambda(done, space, store, study_uri)
        plots += [joint] if joint else []
        signal = early_signal(done, metric).dropna()
        if len(signal):
            plots.append(plot_signal(done, signal, metric, store, study_uri))
        curves = plot_finetune(history, metric, store, study_uri)
        plots += [curves] if curves else []
        if folder.compare_variants() is not None:  # raysd compare: the paper's Figures 4 and 5
            plots += [_save(fig, store, name, study_uri)
                      for name, fig in paper_figures(trials, metric).items()]
    if plots:
        lines += ["\nplots:", *(f"  {p}" for p in plots)]
    return "\n".join(lines)


def list_studies(storage: str) -> str:
    """`raysd ls`: one line per study under `storage`, newest first."""
    import pyarrow.fs as pafs

    rows, store = [], Store(storage)
    if store.fs.get_file_info(store.root).type == pafs.FileType.File:
        raise ConfigError(f"{storage} is a file, not a folder of studies")
    for name in store.list():
        folder = StudyFolder(f"{storage}/{name}")
        if not folder.is_study():
            continue
        trials, (metric, _) = folder.trials(), folder.objective()
        done = folder.ranked(trials)
        updated = folder.updated()
        rows.append({"study": name, "space": folder.about().get("space", "?"),
                     "model": folder.space_doc().get("model"), **status_counts(trials),
                     "best": f"{metric} {done.iloc[0][metric]:.4f}" if len(done) else "-",
                     "updated": updated.strftime("%Y-%m-%d %H:%M") if updated else "-"})
    if not rows:
        return f"no raysd studies in {storage}"
    table = pd.DataFrame(rows).sort_values("updated", ascending=False)
    return table.to_string(index=False)
