"""raysd's command line: parse flags, make paths absolute, hand over. Nothing else lives here."""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import secrets
import sys
import tempfile
import time

from raysd.config import METHODS
from raysd.credentials import redact, redact_logs
from raysd.data.base import SOURCES
from raysd.errors import ConfigError
from raysd.paths import absolute_uri

DEFAULT_STORAGE = "raysd_results"


def _overrides(args) -> dict:
    from raysd.overrides import parse_overrides

    values = parse_overrides(args.set or [])
    if args.data:
        values["data"] = args.data
    if args.workers is not None:
        values["resources.workers"] = args.workers
    if args.gpu is not None:
        values["resources.use_gpu"] = args.gpu
    if getattr(args, "method", None):
        values["method"] = args.method
    if getattr(args, "optuna_storage", None):
        values["study.optuna_storage"] = args.optuna_storage
    if args.keep_models:
        values["study.keep_models"] = args.keep_models
    if args.logger:
        values["study.loggers"] = list(dict.fromkeys(args.logger))
    if args.artifacts:
        values["study.artifacts"] = args.artifacts
    return values


def _study_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--space", help="a space name (raysd spaces) or a YAML file")
    p.add_argument("--data", help=" | ".join(SOURCES))
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a dotted key of the space file (repeatable)")
    p.add_argument("--storage", default=DEFAULT_STORAGE,
                   help="local folder, shared filesystem or s3:// / gs:// URI (default: ./raysd_results)")
    p.add_argument("--name", help="study name (default: <space>-<date>-<time>)")
    p.add_argument("--workers", type=int, help="Ray Train workers (DDP ranks) per trial")
    gpu = p.add_mutually_exclusive_group()
    gpu.add_argument("--gpu", dest="gpu", action="store_true", default=None, help="one GPU per worker")
    gpu.add_argument("--cpu", dest="gpu", action="store_false", help="train on CPUs")
    p.add_argument("--artifacts", metavar="URI",
                   help="where pre-training stage outputs are shared, e.g. by several studies "
                        "(default: <study>/artifacts; none: every trial trains every stage)")
    p.add_argument("--keep-models", choices=("best", "all", "none"),
                   help="fine-tuned models kept under <study>/models for raysd export (default: best)")
    p.add_argument("--logger", action="append", choices=("mlflow", "wandb"),
                   help="also log to MLflow (MLFLOW_TRACKING_URI, default sqlite <study>/mlflow.db) or "
                        "W&B (WANDB_PROJECT, WANDB_MODE=offline); repeatable")
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: what the cluster fits)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--smoke", action="store_true",
                   help="a few minutes' run of the space to check data, weights and every stage "
                        "before a cluster run (results are marked smoke, never comparable)")
    p.add_argument("-v", "--verbose", action="store_true", help="show Ray's own logs and tables")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raysd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    tune = sub.add_parser("tune", help="run a Ray Tune + Optuna study of a search space")
    _study_args(tune)
    tune.add_argument("--num-samples", type=int, help="trials in the study (default: the space's)")
    tune.add_argument("--resume", metavar="STUDY_DIR", help="finish a study that was interrupted")
    tune.add_argument("--optuna-storage", metavar="URL",
                      help="an RDB URL (sqlite:///optuna.db, postgresql://...), or env:NAME for one in "
                           "the variable NAME, for the Optuna study (default: <study>/optuna.journal)")
    run = sub.add_parser("run", help="run one trial with the space's default values (no search)")
    _study_args(run)
    run.add_argument("--method", choices=METHODS)
    compare = sub.add_parser("compare", help="methods (or a study's top trials) over seeds: "
                                             "mean ± std and paired differences")
    _study_args(compare)
    compare.add_argument("--methods", help=f"comma-separated, of {', '.join(METHODS)} "
                                           "(default: finetune,further_pretrain,self_distill)")
    compare.add_argument("--rounds", help="comma-separated T' for self_distill (default: the space's)")
    compare.add_argument("--seeds", type=int, help=f"seeds per method or trial (default {SEEDS})")
    compare.add_argument("--first-seed", type=int, metavar="N", help="seeds N, N+1, ... (default 0)")
    compare.add_argument("--protocol", metavar="full|reference",
                         help="every stage per seed (full, default), or pre-train once and repeat "
                              "only fine-tuning over seeds, as the reference code did")
    compare.add_argument("--from", dest="from_study", metavar="STUDY",
                         help="compare this study's top trials instead of methods")
    compare.add_argument("--top", type=int, help=f"with --from: how many trials (default {TOP})")
    compare.add_argument("--resume", metavar="STUDY_DIR", help="finish a comparison that was interrupted")
    sub.add_parser("spaces", help="list the built-in search spaces")
    report = sub.add_parser("report", help="tables and plots of a finished study")
    report.add_argument("study", help="<storage>/<study> folder or URI")
    report.add_argument("--top", type=int, default=5, help="rows in the top-trials table")
    export = sub.add_parser("export", help="a trial's fine-tuned model as a transformers (and timm) folder")
    export.add_argument("study", help="<storage>/<study> folder or URI")
    export.add_argument("out", help="the folder to write")
    export.add_argument("--trial", default="best", help="best (by the validation metric), a trial id (a chain: its best point) or "
                             "ID@T' (one point of a chain: the one whose model it kept)")
    ls = sub.add_parser("ls", help="the studies in a storage: space, trials by status, best value")
    ls.add_argument("storage", nargs="?", default=DEFAULT_STORAGE,
                    help="local folder or URI (default: ./raysd_results)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    redact_logs()  # no URL's password in any log line of this process (credentials.py)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as err:
        print(f"raysd: error: {redact(str(err))}", file=sys.stderr)
        return 2
    except PermissionError as err:  # the OS refused a path the user gave (chmod, a read-only mount)
        where = err.filename or str(err).split("] ", 1)[-1].split(". Detail")[0]
        print(f"raysd: error: {where}: permission denied", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        command = "compare" if args.command == "compare" else "tune"
        print(f"raysd: interrupted; resume with raysd {command} --resume <storage>/<study>",
              file=sys.stderr)
        return 130


def cmd_spaces(args) -> int:
    from raysd.spaces import available, load_space

    for name in available():
        print(f"{name:14s} {load_space(name).description}")
    return 0


# Flags that --resume cannot take: the study keeps the space, data and size it started with.
RESUME_CONFLICTS = ("space", "data", "set", "name", "workers", "gpu", "num_samples", "max_concurrent",
                    "optuna_storage", "keep_models", "logger")

# Flags of compare that choose its trials (dest: flag): a resumed comparison keeps its own.
COMPARE_ONLY = {"methods": "--methods", "rounds": "--rounds", "seeds": "--seeds",
                "from_study": "--from", "top": "--top", "first_seed": "--first-seed",
                "protocol": "--protocol"}
SEEDS, TOP = 3, 3


def _prepare(args, single: bool, space=None, load=None):
    """Validate everything that can be validated before Ray starts. `load` (overrides -> Space)
    reloads `space` for --smoke (default: load_space of --space)."""
    from raysd.checks import check_artifacts, check_inputs, check_loggers, check_storage
    from raysd.spaces import load_space

    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise ConfigError(f"--max-concurrent must be >= 1 (got {args.max_concurrent})")
    if getattr(args, "num_samples", None) is not None and args.num_samples < 1:
        raise ConfigError(f"--num-samples must be >= 1 (got {args.num_samples})")
    if getattr(args, "resume", None):
        from raysd.study_folder import StudyFolder

        given = [f"--{flag.replace('_', '-')}" for flag in RESUME_CONFLICTS
                 if getattr(args, flag, None) is not None]
        if given:
            raise ConfigError(f"--resume continues the study as it was started; drop {', '.join(given)}")
        study_uri = absolute_uri(args.resume)
        folder = StudyFolder(study_uri)
        space = folder.space()
        _check_resumed_by(args.command, study_uri)
        from raysd.resume import check_resumable

        check_resumable(folder.about(), study_uri)
        if space.study.optuna_storage:  # its URL comes from the environment again (credentials.py)
            from raysd import optuna_study

            optuna_study.storage(study_uri, space.study.optuna_storage)
        return space, study_uri
    if space is None and not args.space:
        raise ConfigError("--space is required (see raysd spaces)")
    space = space or load_space(args.space, _overrides(args))
    if args.smoke:
        space = _smoke(args, space, load or (lambda overrides: load_space(args.space, overrides)))
    if single:
        space = dataclasses.replace(space, params=())
    kind = f"{space.name}-smoke" if args.smoke else space.name
    name = args.name or default_name(kind)
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name) or name in (".", ".."):
        raise ConfigError(f"--name {name!r}: use letters, digits, '.', '_' and '-' only "
                          "(and not '.' or '..')")
    storage = absolute_uri(args.storage).rstrip("/")
    check_storage(storage)
    check_artifacts(space.study.artifacts, f"{storage}/{name}")
    check_loggers(space.study.loggers or (), storage)
    check_inputs(space)
    if space.params:  # a search: its Optuna study must be new
        from raysd import optuna_study

        optuna_study.check_new(f"{storage}/{name}", space.study.optuna_storage)
    return space, f"{storage}/{name}"


def default_name(kind: str) -> str:
    """<kind>-<date>-<time>-<4 hex>: the random part keeps two studies started in the same
    second apart (and should it ever repeat, the second driver finds the name taken)."""
    return f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def _check_resumed_by(command: str, study_uri: str) -> None:
    """A comparison is resumed by compare (which writes its table), a study by tune."""
    from raysd.study_folder import StudyFolder

    is_compare = StudyFolder(study_uri).compare_variants() is not None
    if is_compare and command != "compare":
        raise ConfigError(f"--resume {study_uri}: a raysd compare study; finish it with "
                          f"raysd compare --resume {study_uri}")
    if command == "compare" and not is_compare:
        raise ConfigError(f"--resume {study_uri}: not a raysd compare study; finish it with "
                          f"raysd tune --resume {study_uri}")


def _smoke(args, space, load):
    """The space shrunk by --smoke (flags given with --set win), and one block saying how."""
    from raysd.overrides import current_value, smoke_overrides

    remote = bool(args.address or os.environ.get("RAY_ADDRESS"))
    cfg = space.trial_config()
    use_gpu = cfg.resources.use_gpu and (remote or _local_gpu())
    user = _overrides(args)
    changes = {k: v for k, v in smoke_overrides(space, use_gpu).items() if k not in user}
    changes = {k: v for k, v in changes.items() if (current_value(space, k) or None) != (v or None)}
    print("raysd: --smoke shrinks what costs time (results are marked smoke):")
    for key, value in changes.items():
        print(f"  {key}: {current_value(space, key)} -> {value}")
    return load({**changes, **user})


def _local_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def cmd_tune(args, single: bool = False) -> int:
    space, study_uri = _prepare(args, single)
    outcome = _drive(args, space, study_uri, f"raysd: study {study_uri}",
                     resume=bool(getattr(args, "resume", None)),
                     num_samples=1 if single else args.num_samples)
    counts = ", ".join(f"{n} {s}" for s, n in outcome.counts.items())
    print(f"raysd: {counts}")
    if not outcome.finished:  # Ctrl-C: no "best" of a study half run
        print(f"raysd: interrupted; finish it with raysd tune --resume {study_uri}", file=sys.stderr)
        return 130
    if outcome.best:
        best = outcome.best
        params = {k[len("param."):]: v for k, v in best.items() if k.startswith("param.")}
        metrics = {k: v for k, v in best.items() if k.startswith(("val_", "test_"))}
        print(f"raysd: best trial {best['trial_id']}" + (f" {params}" if params else ""))
        print("raysd: " + "  ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())))
    print(f"raysd: results in {study_uri}/results (trials.parquet, history/); "
          f"tensorboard --logdir {study_uri}/tensorboard")
    return 0 if outcome.counts.get("completed") else 1


def _drive(args, space, study_uri: str, announce: str, **run):
    """Hold the study (one driver), start Ray and run the study: its StudyOutcome."""
    from raysd.cluster import ensure_ray
    from raysd.driver_lock import DriverLock
    from raysd.study import run_study

    with DriverLock(study_uri):  # taken before Ray starts: a second driver is refused at once
        # Every path is absolute by now. Work from a folder that outlives the run: Ray can garbage-
        # collect a job's working_dir package under a still-running driver (seen with Ray 2.60).
        os.chdir(tempfile.gettempdir())
        ensure_ray(args.address, args.verbose)
        print(announce)
        return run_study(space, study_uri, max_concurrent=args.max_concurrent, verbose=args.verbose,
                         **run)


def cmd_run(args) -> int:
    return cmd_tune(args, single=True)


def cmd_compare(args) -> int:
    """Every variant x seed as one side-by-side Ray Tune run, then the table of their results."""
    args.num_samples = None
    if args.resume:
        given = [flag for dest, flag in COMPARE_ONLY.items() if getattr(args, dest) is not None]
        if given:
            raise ConfigError(f"--resume continues the comparison as it was started; drop {', '.join(given)}")
        space, study_uri = _prepare(args, single=False)
        from raysd.study_folder import StudyFolder

        variants, labels = None, StudyFolder(study_uri).compare_variants()
    else:
        space, study_uri, variants = _compare_trials(args)
        labels = list(dict.fromkeys(v["variant"] for v in variants))
    what = "the comparison" if args.resume else f"{len(variants)} trials"
    outcome = _drive(args, space, study_uri,
                     f"raysd: {'resuming' if args.resume else 'comparing'} {what} in {study_uri}",
                     resume=bool(args.resume), variants=variants)
    if not outcome.finished:  # Ctrl-C: no table of a comparison half run
        print(f"raysd: interrupted; finish it with raysd compare --resume {study_uri}", file=sys.stderr)
        return 130
    from raysd.compare import write_table

    text = write_table(study_uri, space.study.metric, labels)
    if text is None:
        return 1
    print(text + f"raysd: table and plot in {study_uri}/results (compare.txt, compare.png); "
          f"the paper's Figures 4 and 5: raysd report {study_uri}")
    return 0 if outcome.counts.get("completed") else 1


def _compare_trials(args):
    """(space, study URI, variants) of a new comparison, validated before Ray starts."""
    from raysd.compare import DEFAULT_METHODS, method_variants, parse_rounds, trial_variants

    seeds = SEEDS if args.seeds is None else args.seeds
    chosen = dict(seeds=seeds, protocol=args.protocol or "full", first_seed=args.first_seed or 0)
    if args.top is not None and args.top < 1:
        raise ConfigError(f"--top {args.top}: must be at least 1")
    if "finetune.seed" in _overrides(args):
        raise ConfigError("--set finetune.seed: compare sets the seeds (--seeds, --first-seed, --protocol)")
    if args.from_study:
        from raysd.storage import SPACE_FILE
        from raysd.study_folder import StudyFolder

        source = absolute_uri(args.from_study)
        folder = StudyFolder(source)
        studied, trials = folder.space(), folder.trials()
        if trials.empty:
            raise ConfigError(f"--from {source}: no trials recorded")
        variants = trial_variants(trials, studied.study.metric, studied.study.mode,
                                  TOP if args.top is None else args.top, **chosen)
        text, where, name = folder.store.read_text(SPACE_FILE), f"{source}/{SPACE_FILE}", studied.name
    elif not args.space:
        raise ConfigError("--space (or --from STUDY, or --resume STUDY_DIR) is required")
    else:
        from raysd.spaces import read_space_file, resolve_path

        path = resolve_path(args.space)
        text, where, name = read_space_file(path), str(path), path.stem
        methods = args.methods.split(",") if args.methods else DEFAULT_METHODS
        variants = method_variants([m.strip() for m in methods], parse_rounds(args.rounds), **chosen)

    def load(overrides: dict):  # the fixed points are the variants': no search, no ASHA
        from raysd.spaces import load_space_text

        base = load_space_text(text, where, name, overrides)
        return dataclasses.replace(base, params=(), study=dataclasses.replace(base.study, scheduler=None))

    space = load(_overrides(args))
    args.name = args.name or default_name(f"{space.name}-compare")
    space, study_uri = _prepare(args, single=False, space=space, load=load)
    for variant in variants:  # every variant's values must make a valid trial
        space.trial_config(variant["values"])
    return space, study_uri, variants


def cmd_report(args) -> int:
    from raysd.report import write_report

    print(write_report(absolute_uri(args.study), top=args.top))
    return 0


def cmd_export(args) -> int:
    from raysd.export import export_trial

    trial_id, out = export_trial(absolute_uri(args.study), args.trial, absolute_uri(args.out))
    print(f"raysd: trial {trial_id} exported to {out}")
    return 0


def cmd_ls(args) -> int:
    from raysd.report import list_studies

    storage = absolute_uri(args.storage).rstrip("/")
    print(list_studies(storage))
    return 0


COMMANDS = {"tune": cmd_tune, "run": cmd_run, "compare": cmd_compare, "spaces": cmd_spaces,
            "report": cmd_report, "export": cmd_export, "ls": cmd_ls}

if __name__ == "__main__":
    sys.exit(main())
