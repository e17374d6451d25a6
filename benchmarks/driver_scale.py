"""Does the study driver's cost per result stay flat as a study grows? raysd's real driver side
(run_study: StudyRecorder with its Parquet and TensorBoard writers and artifact bookkeeping, the
console, the Optuna searcher with its journal) runs trials that only report raysd-shaped rows -
no Ray Train, no model - and so does a bare Tune run of the same trainable (random search, no
callbacks), each size in a fresh process with its own local Ray.

  python benchmarks/driver_scale.py                          # 100 and 1000 trials x 100 reports
  python benchmarks/driver_scale.py --sizes 50,200 --reports 50 --concurrent 8

Prints, per size and run: driver CPU-seconds per result (the driver process's user+sys time over
fit(), all its threads), wall seconds, peak driver RSS, bytes the driver wrote per result
(/proc/self/io wchar: every write() of the process, files and pipes) and the study folder's
bytes per result; then
    driver_scale: per_result_ratio=R overhead_vs_tune=O peak_driver_mb=M
R: raysd's CPU per result at the largest size over that at the smallest; O: raysd's CPU per
result over bare Tune's at the largest size, minus 1; M: the largest raysd driver peak RSS.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGES = (("further_pretrain", 0, 0.4), ("self_distill", 1, 0.3), ("finetune", 0, 0.3))


def report_rows(seed: float, reports: int):
    """A trial's rows as raysd's recipe reports them: steps of each stage, a stage-boundary row
    repeating the stage's last step with its signal, fine-tuning's validations, the last row."""
    progress = 0
    for stage, round_, share in STAGES:
        steps = max(2, int(reports * share))
        for step in range(1, steps + 1):
            progress += 1
            row = {"stage": stage, "round": round_, "step": step, "progress": progress, "attempt": 0,
                   "loss": 1.0 / step, "lr": 1e-4, "samples_per_s": 500.0}
            if stage == "finetune":
                row["ce_loss"] = row["loss"]
                if step % 10 == 0:
                    row.update(val_accuracy=0.5 + seed / 4, val_loss=1.0 - seed / 4)
            else:
                row["mae_loss"] = row["loss"]
            yield row
        if stage != "finetune":
            yield {**row, "knn_accuracy": seed, "stages_done": 1 + (stage == "self_distill")}
    yield {**row, "val_accuracy": 0.5 + seed / 4, "val_loss": 0.5, "test_accuracy": 0.5 + seed / 5,
           "test_loss": 0.6, "train_loss": 0.4, "gen_gap": 0.2, "init_distance": 1.0,
           "seconds_finetune": 1.0, "steps_finetune": 30, "trial_done": True}


def fake_driver(config: dict, space=None, train_storage=None, artifacts=None, models=None, janitor=None,
                reports: int = 100) -> None:
    """A trial that only reports; like a real one it leaves a train/ folder and a saved model,
    so the recorder's artifact bookkeeping runs."""
    from ray import tune

    from raysd.resume import TRIAL_ID

    tid = config.get(TRIAL_ID, "bare")
    for where in (train_storage, models):
        if where:
            Path(where, tid).mkdir(parents=True, exist_ok=True)
            Path(where, tid, "weights.bin").write_bytes(b"0" * 1024)
    seed = float(config.get("mask_ratio", 0.7))
    for row in report_rows(seed, reports):
        tune.report(row)


def measure(fn) -> dict:
    def wchar() -> int:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("wchar:"):
                return int(line.split()[1])
        return 0

    before, written, started = resource.getrusage(resource.RUSAGE_SELF), wchar(), time.time()
    fn()
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"cpu_s": after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime,
            "wall_s": time.time() - started, "written": wchar() - written,
            "peak_mb": after.ru_maxrss / 1024}


def child(kind: str, trials: int, reports: int, concurrent: int) -> dict:
    import ray

    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"  # as run_study sets it, for both
    os.environ.setdefault("RAYSD_PROGRESS_SECONDS", "30")
    work = os.environ["DRIVER_SCALE_DIR"]
    ray.init(address="local", num_cpus=concurrent + 1, include_dashboard=False,
             logging_level="ERROR", log_to_driver=False, _temp_dir=f"{work}/ray")
    study = f"{work}/storage/{kind}"
    if kind == "raysd":
        import io
        from contextlib import redirect_stdout

        from raysd.spaces import load_space
        from raysd.study import run_study

        space = load_space("demo", {"study.keep_models": "best", "weights": "none"})  # no demo build

        def run():
            with redirect_stdout(io.StringIO()):  # the console still formats every line
                run_study(space, study, num_samples=trials, max_concurrent=concurrent,
                          driver=lambda config, **kw: fake_driver(config, reports=reports, **kw))
    else:
        from ray import tune

        from raysd.cluster import autoscaler_node_types, study_driver_placement

        def run():  # placed as run_study places trials
            trainable = tune.with_resources(tune.with_parameters(fake_driver, reports=reports),
                                            study_driver_placement(autoscaler_node_types()))
            tune.Tuner(trainable, param_space={"mask_ratio": tune.uniform(0.5, 0.9)},
                       tune_config=tune.TuneConfig(num_samples=trials, max_concurrent_trials=concurrent),
                       run_config=tune.RunConfig(name=kind, storage_path=f"{work}/storage",
                                                 verbose=0)).fit()
    out = measure(run)
    ray.shutdown()
    rows = list(report_rows(0.5, reports))
    results = len(rows) * trials
    if kind == "raysd":  # each step recorded once: a stage's summary row replaces its last
        from raysd.study_folder import StudyFolder

        recorded = StudyFolder(study)
        assert len(recorded.trials()) == trials, len(recorded.trials())
        assert len(recorded.history_rows()) == (len(rows) - 3) * trials, len(recorded.history_rows())
    folder = sum(p.stat().st_size for p in Path(study).rglob("*") if p.is_file())
    return {**out, "results": results, "folder_bytes": folder}


def _kill_processes_mentioning(marker: str) -> None:
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if marker.encode() in (proc / "cmdline").read_bytes():
                    os.kill(int(proc.name), signal.SIGKILL)
            except OSError:
                pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100,1000", help="trial counts, comma-separated")
    parser.add_argument("--reports", type=int, default=100, help="reports per trial (about)")
    parser.add_argument("--concurrent", type=int, default=8)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, trials = args.child.split(":")
        print(json.dumps(child(kind, int(trials), args.reports, args.concurrent)))
        return 0
    sizes = [int(s) for s in args.sizes.split(",")]
    per: dict[tuple[str, int], dict] = {}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    for size in sizes:
        for kind in ("tune", "raysd"):
            work = tempfile.mkdtemp(prefix="rds", dir="/tmp")  # short: Ray's socket paths
            try:
                done = subprocess.run([sys.executable, __file__, "--child", f"{kind}:{size}",
                                       "--reports", str(args.reports), "--concurrent", str(args.concurrent)],
                                      capture_output=True, text=True, env={**env, "DRIVER_SCALE_DIR": work})
            finally:  # what the child's Ray left running, by pid; then its files
                _kill_processes_mentioning(work)
                shutil.rmtree(work, ignore_errors=True)
            if done.returncode != 0:
                print(done.stdout[-2000:], done.stderr[-4000:], file=sys.stderr)
                return 1
            m = per[kind, size] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{kind:5s} {size:5d} trials x {args.reports} reports: "
                  f"{m['cpu_s'] / m['results'] * 1e3:.3f} ms driver CPU/result, {m['wall_s']:.0f} s wall, "
                  f"peak {m['peak_mb']:.0f} MB, {m['written'] / m['results']:.0f} B written/result, "
                  f"folder {m['folder_bytes'] / m['results']:.0f} B/result", flush=True)
    cost = {k: m["cpu_s"] / m["results"] for k, m in per.items()}
    ratio = cost["raysd", sizes[-1]] / cost["raysd", sizes[0]]
    overhead = cost["raysd", sizes[-1]] / cost["tune", sizes[-1]] - 1
    peak = max(m["peak_mb"] for (kind, _), m in per.items() if kind == "raysd")
    print(f"driver_scale: per_result_ratio={ratio:.2f} overhead_vs_tune={overhead:.2f} peak_driver_mb={peak:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
