"""What stage reuse saves on a study: one fixed list of (gamma, lambda, T') trials on the demo,
run twice in this process - every trial training every stage, then with shared artifacts - and
the results compared trial by trial (reuse must not change them at a fixed seed).

  python benchmarks/study_cost.py                # the demo's budgets (about 15 min on 2 cores)
  python benchmarks/study_cost.py --scale 0.25   # a quarter of every stage's steps
  python benchmarks/study_cost.py --chain --scale 0.25   # param mode vs chain mode (below)

--chain compares how a searched T' is run, on the same (gamma, lambda) set, both with shared
artifacts: param mode, one trial per (gamma, lambda) with T' in 0..3 chosen by a seeded Optuna
TPE; chain mode (chain.py), one chain per (gamma, lambda) fine-tuned at T' = 0..3. It prints the
training seconds per (gamma, lambda, T') point evaluated in each, checks that the points both
evaluated have identical metrics, and ends with one line:
`chain: seconds_per_point_ratio=R shared_points_identical=yes|no` (R = chain / param).

It runs the Ray-free recipe one trial after another: it measures compute, which is what reuse
saves. A study on Ray adds the same per-trial overhead (starting a worker group) to both runs.
Prints per-run training and wall seconds, their ratio, the tree's cost floor, and the same ratio
projected to the paper's budgets (Table 9) from the per-sample stage costs measured here.
"""
from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time

from raysd import schema
from raysd.artifacts import ArtifactStore
from raysd.chain import Chain, points
from raysd.bootstrap import theta_init
from raysd.data import load_task
from raysd.recipe import Hooks, run_trial
from raysd.spaces import load_space

# The paper's Table 6 and Figure 4 questions as one grid: which lambda, which gamma, how many
# rounds. Trials that differ only in T' share every stage but their last rounds.
GRID = [dict(mask_ratio=g, **{"self_distill.mae_weight": lam, "self_distill.rounds": t})
        for g, lam, t in itertools.product((0.6, 0.75), (0.3, 1.0), (1, 2, 3))]
# Table 9 (ViT-B/16): steps and global batch of each stage.
PAPER = {"further_pretrain": (20000, 64), "self_distill": (20000, 64), "finetune": (10000, 32)}


def configs(scale: float) -> list:
    space = load_space("demo")
    out = []
    for params in GRID:
        cfg = space.trial_config(params)
        scaled = {}
        for stage in ("further_pretrain", "self_distill", "finetune"):
            scfg = getattr(cfg, stage)
            scaled.update({f"{stage}.steps": max(2, int(scfg.steps * scale)),
                           f"{stage}.warmup_steps": int(scfg.warmup_steps * scale)})
        every = max(1, int(cfg.evaluation.every * scale)) if cfg.evaluation.every else 0
        out.append(schema.with_values(cfg, {**scaled, "evaluation.every": every,
                                            "logging.checkpoint_every": 10**9}))
    return out


def run(cfgs: list, task, store_dir: str | None) -> list[tuple[dict, float]]:
    results = []
    for i, cfg in enumerate(cfgs):
        store = ArtifactStore(store_dir, owner=f"trial-{i}") if store_dir else None
        started = time.perf_counter()
        summary = run_trial(cfg, task, theta_init(cfg.model, cfg.weights, cfg.seed),
                            Hooks(artifacts=store))
        results.append((summary, time.perf_counter() - started))
        reused = [k[len("reused_"):] for k, v in summary.items() if k.startswith("reused_") and v]
        print(f"  {i + 1:2d}/{len(cfgs)} gamma {cfg.mask_ratio:.2f} "
              f"lambda {cfg.self_distill.mae_weight:.1f} "
              f"T' {cfg.self_distill.rounds}  val_accuracy {summary['val_accuracy']:.4f}  "
              f"trained {summary['trained_seconds']:6.1f} s  reused: {', '.join(reused) or '-'}",
              flush=True)
    return results


def per_sample_seconds(cfgs: list, results: list) -> dict[str, float]:
    """Seconds per training sample of each stage, from the run without reuse."""
    totals = {s: [0.0, 0] for s in PAPER}
    for cfg, (summary, _) in zip(cfgs, results):
        for key, seconds in summary.items():
            if key.startswith("seconds_"):
                stage = "self_distill" if key.startswith("seconds_self_distill") else key[len("seconds_"):]
                scfg = getattr(cfg, stage)
                totals[stage][0] += seconds
                totals[stage][1] += scfg.steps * scfg.batch_size
    return {s: sec / n for s, (sec, n) in totals.items() if n}


def tree_cost(cfgs: list, unit: dict[str, float], shared: bool) -> float:
    """Training cost of the list: every trial's stages, or each node of the stage tree once."""
    nodes, cost = set(), 0.0
    for cfg in cfgs:
        path = [("further_pretrain", cfg.mask_ratio)]
        path += [("self_distill", cfg.mask_ratio, cfg.self_distill.mae_weight, t)
                 for t in range(1, cfg.self_distill.rounds + 1)]
        for node in path:
            if not shared or node not in nodes:
                cost += unit[node[0]]
            nodes.add(node)
        cost += unit["finetune"]
    return cost


CHAIN_POINTS = (0, 1, 2, 3)


def chain_case(cfgs: list, task) -> bool:
    """Param mode (TPE picks T' per (gamma, lambda)) vs chain mode on the same pairs; True when
    the shared points are identical."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pairs = list(dict.fromkeys((c.mask_ratio, c.self_distill.mae_weight) for c in cfgs))
    base = {(c.mask_ratio, c.self_distill.mae_weight): c for c in cfgs}
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    param: dict = {}
    with tempfile.TemporaryDirectory() as store:
        print("param mode (TPE chooses T'):")
        for i, pair in enumerate(pairs):
            trial = study.ask()
            t = trial.suggest_int("self_distill.rounds", min(CHAIN_POINTS), max(CHAIN_POINTS))
            cfg = schema.with_values(base[pair], {"self_distill.rounds": t})
            summary = run_trial(cfg, task, theta_init(cfg.model, cfg.weights, cfg.seed),
                                Hooks(artifacts=ArtifactStore(store, owner=f"param-{i}")))
            study.tell(trial, summary["val_accuracy"])
            param[(*pair, t)] = summary
            print(f"  gamma {pair[0]:.2f} lambda {pair[1]:.1f} T' {t}  val_accuracy "
                  f"{summary['val_accuracy']:.4f}  trained {summary['trained_seconds']:6.1f} s", flush=True)
    chain: dict = {}
    chain_seconds = 0.0
    with tempfile.TemporaryDirectory() as store:
        print(f"chain mode (T' = {', '.join(map(str, CHAIN_POINTS))} from one chain each):")
        for i, pair in enumerate(pairs):
            cfg = base[pair]
            summary = run_trial(cfg, task, theta_init(cfg.model, cfg.weights, cfg.seed),
                                Hooks(artifacts=ArtifactStore(store, owner=f"chain-{i}")),
                                chain=Chain(CHAIN_POINTS))
            chain_seconds += summary["trained_seconds"]
            for t, metrics in points(summary).items():
                chain[(*pair, t)] = metrics
            print(f"  gamma {pair[0]:.2f} lambda {pair[1]:.1f}  val_accuracy by T' "
                  + " ".join(f"{points(summary)[t]['val_accuracy']:.4f}" for t in CHAIN_POINTS)
                  + f"  trained {summary['trained_seconds']:6.1f} s", flush=True)
    param_seconds = sum(s["trained_seconds"] for s in param.values())
    per_point = (param_seconds / len(param), chain_seconds / len(chain))
    shared = [k for k in param if k in chain]
    keys = [k for k in chain[shared[0]] if k.startswith(("val_", "test_"))] if shared else []
    same = bool(shared) and all(param[k][m] == chain[k][m] for k in shared for m in keys)
    print(f"training seconds per point  param {per_point[0]:7.1f} ({len(param)} points)  "
          f"chain {per_point[1]:7.1f} ({len(chain)} points)")
    print(f"shared points: {len(shared)}, {len(keys)} metrics each")
    print(f"chain: seconds_per_point_ratio={per_point[1] / per_point[0]:.3f} "
          f"shared_points_identical={'yes' if same else 'no'}")
    return same


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every stage's steps")
    parser.add_argument("--chain", action="store_true", help="param mode vs chain mode instead")
    args = parser.parse_args()
    cfgs = configs(args.scale)
    if args.chain:
        task = load_task(cfgs[0].data, image_size=32)
        theta_init(cfgs[0].model, cfgs[0].weights, cfgs[0].seed)
        return 0 if chain_case(cfgs, task) else 1
    task = load_task(cfgs[0].data, image_size=32)
    theta_init(cfgs[0].model, cfgs[0].weights, cfgs[0].seed)  # build the demo's weights first
    print(f"{len(cfgs)} trials: gamma x lambda x T' = (0.6, 0.75) x (0.3, 1.0) x (1, 2, 3); "
          f"steps FPT/SD/FT {cfgs[0].further_pretrain.steps}/{cfgs[0].self_distill.steps}/"
          f"{cfgs[0].finetune.steps}")
    print("reuse off:")
    off = run(cfgs, task, None)
    with tempfile.TemporaryDirectory() as store:
        print("reuse on:")
        on = run(cfgs, task, store)
    trained = [sum(s["trained_seconds"] for s, _ in r) for r in (off, on)]
    wall = [sum(w for _, w in r) for r in (off, on)]
    keys = [k for k in off[0][0] if k.startswith(("val_", "test_"))]
    same = all(a[k] == b[k] for (a, _), (b, _) in zip(off, on) for k in keys)
    unit = per_sample_seconds(cfgs, off)
    stage_unit = {s: unit[s] * getattr(cfgs[0], s).steps * getattr(cfgs[0], s).batch_size for s in unit}
    floor = tree_cost(cfgs, stage_unit, True) / tree_cost(cfgs, stage_unit, False)
    paper_unit = {s: unit[s] * steps * batch for s, (steps, batch) in PAPER.items()}
    paper = tree_cost(cfgs, paper_unit, True) / tree_cost(cfgs, paper_unit, False)
    print(f"training seconds  off {trained[0]:8.1f}  on {trained[1]:8.1f}  ratio {trained[1] / trained[0]:.3f}")
    print(f"wall seconds      off {wall[0]:8.1f}  on {wall[1]:8.1f}  ratio {wall[1] / wall[0]:.3f}")
    print(f"cost floor (each node of the stage tree trained once): ratio {floor:.3f}")
    print("seconds per training sample: " + ", ".join(f"{s} {v * 1e3:.2f} ms" for s, v in unit.items()))
    print(f"projected at the paper's budgets (20k/20k/10k steps at batch 64/64/32): ratio {paper:.3f}")
    print(f"val/test metrics identical with and without reuse: {'yes' if same else 'NO'} "
          f"({len(keys)} metrics x {len(cfgs)} trials)")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
