"""THE METHOD (Lee et al., ICLR 2023), free of Ray: one trial, read top to bottom as Algorithm 1.

  theta_0 = further_pretrain(theta_init, D_u)                                  (Alg. 2)
  for t in 1..T':  theta_t = self_distill_round(theta_init, teacher=theta_{t-1}, D_u)
  metrics = finetune_and_evaluate(theta_T', D_tr)  -> val and test metrics (and the model,
                                                      kept when the caller's hooks save it)

A chain (chain.py) runs the rounds up to T_max and fine-tunes after theta_0 and after every
round: one (gamma, lambda) yields every T' point, each equal to a trial of that T' alone.

Every pre-training stage's output is an artifact keyed by everything that determines it
(artifacts.py): a trial whose key exists loads it instead of training, and two trials never
train the same key at once. After each pre-training stage an early signal (k-NN accuracy of the
representation) is reported with `stages_done`, the clock ASHA's rungs use: trials are compared
after equal work, and a long trial (large T') is never cut for being long.

The caller passes Hooks (stages.py): the device, DDP wrapping, an all-reduce, a
`report(metrics, state)` callback called by every rank at the same steps, a state to resume
from, the artifact store, and where to save the fine-tuned model.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from typing import Callable

import torch
from torch import nn

from raysd import __version__
from raysd.chain import Chain
from raysd.artifacts import LAYOUT, code_version, digest, library_versions, state_hash
from raysd.config import TrialConfig
from raysd.schema import key_inputs
from raysd.data import Task
from raysd.stages import (Hooks, NonFiniteLoss, MidStage, StageRun, finetune_and_evaluate,
                          further_pretrain, knn_signal, self_distill_round)
from raysd.teacher import uses_cache

__all__ = ["Hooks", "NonFiniteLoss", "TrialState", "run_trial", "reuse_or_train", "init_key", "stage_key"]
POLL_SECONDS = 5.0  # how often a trial waiting for another's artifact looks again
DECISIONS = ("ready", "build", "wait")


@dataclasses.dataclass
class TrialState:
    """Where a trial stands. Every checkpoint saves it; a restarted worker group resumes it."""

    stage_index: int = 0  # the stage running, or next, in cfg.stages()
    theta: dict | None = None  # output of the last finished pre-training stage: the next teacher
    theta_key: str | None = None  # its artifact key (theta_init's key before any stage)
    summary: dict = dataclasses.field(default_factory=dict)  # per-stage cost, keys, signals
    mid_stage: MidStage | None = None  # the running stage's own state, when stopped mid-way

    def to_dict(self) -> dict:
        """Tensors and plain values only, so it loads with torch.load(weights_only=True)."""
        out = {"stage_index": self.stage_index, "theta": self.theta, "theta_key": self.theta_key,
               "summary": self.summary}
        if self.mid_stage is not None:
            out["mid_stage"] = dataclasses.asdict(self.mid_stage)
        return out

    @classmethod
    def from_dict(cls, doc: dict) -> "TrialState":
        mid_stage = doc.get("mid_stage", doc.get("progress"))  # "progress": raysd 0.1's name
        return cls(doc["stage_index"], doc["theta"], doc["theta_key"], doc["summary"],
                   MidStage(**mid_stage) if mid_stage else None)


def stage_name(stage: str, round_: int) -> str:
    return f"self_distill_{round_}" if stage == "self_distill" else stage


def run_trial(cfg: TrialConfig, task: Task, init: nn.Module, hooks: Hooks,
              chain: Chain | None = None) -> dict:
    """Run every stage of cfg.method from theta_init (`init`, never modified); return the
    trial's summary: final metrics, per-stage seconds, artifact keys, reuse and signals.

    With `chain` (chain.py), rounds run up to the chain's deepest point and every point's
    fine-tune follows its round; each point is reported at its boundary with its T' as
    `rounds` and `points_done` (ASHA's clock in a chain study)."""
    cfg = cfg.effective()  # a baseline or ablation: its plan's stages under its settings
    if chain is not None:
        cfg = chain.config(cfg)
    plan = chain.plan(cfg) if chain is not None else cfg.stages()
    state = _resumed(hooks.resume, plan) if hooks.resume is not None else _fresh(cfg, task, init, hooks)
    ledger = Ledger(state.summary)
    last: dict = {}
    for index in range(state.stage_index, len(plan)):
        stage, round_ = plan[index]
        state.stage_index = index
        where = dict(offset=sum(getattr(cfg, s).steps for s, _ in plan[:index]), resume=state.mid_stage,
                     checkpoint=lambda m: dataclasses.replace(state, mid_stage=m).to_dict())
        run = (PointRun(seeded_for(cfg, stage), hooks, stage, 0, point=round_, **where)
               if stage == "finetune" else StageRun(cfg, hooks, stage, round_, **where))
        state.mid_stage = None
        point: dict = {}  # a chain's fine-tune: the point's own metrics, reported at its boundary
        name = f"finetune_{round_}" if chain is not None and stage == "finetune" else stage_name(stage, round_)
        with ledger.stage(name, getattr(cfg, stage).steps) as entry:
            if stage == "further_pretrain":
                key, inputs = agreed_stage_key(state.theta_key, cfg, stage, round_, hooks, task)
                theta, last, entry.trained = reuse_or_train(
                    key, inputs, run, task, init, lambda: further_pretrain(init, task.unlabelled, run))
            elif stage == "self_distill":
                key, inputs = agreed_stage_key(state.theta_key, cfg, stage, round_, hooks, task)
                teacher = state.theta  # theta_{t-1}; the student restarts from theta_init
                theta, last, entry.trained = reuse_or_train(
                    key, inputs, run, task, init,
                    lambda: self_distill_round(init, teacher, task.unlabelled, run))
            else:
                last, final, classifier = finetune_and_evaluate(init, state.theta or init.state_dict(),
                                                                task, run)
                if chain is None:
                    ledger.finish(final)
                else:
                    point = {**final, "rounds": round_,
                             "points_done": sum(1 for s, _ in plan[:index + 1] if s == "finetune")}
                if (chain is None or chain.record(state.summary, round_, final)) and \
                        hooks.save_model is not None and hooks.rank == 0:
                    # Before the last report, so a finished trial always has its model; a worker
                    # group that restarts before that report fine-tunes again and saves again.
                    # A chain keeps the model of its best point so far.
                    hooks.save_model(classifier, {**final, "rounds": round_} if chain else final)
                if chain is None:
                    continue
            if stage != "finetune":
                state.theta, state.theta_key = theta, key
                entry.artifact(key, last)
            last["stages_done"] = index + 1
        # Stage boundary: checkpoint so a restart never repeats a finished stage (nor a chain's
        # fine-tuned point); a trial stopped here (ASHA) keeps the summary so far.
        state.stage_index = index + 1
        hooks.report({**last, **state.summary, **point}, state.to_dict())
    hooks.report({**last, **state.summary, "trial_done": True}, None)
    return state.summary


def seeded_for(cfg: TrialConfig, stage: str) -> TrialConfig:
    """The config a stage runs with: fine-tuning draws its head, batches and dropout from
    finetune.seed when that is set, over pre-training made with the trial's seed."""
    if stage == "finetune" and cfg.finetune.seed is not None:
        return dataclasses.replace(cfg, seed=cfg.finetune.seed)
    return cfg


@dataclasses.dataclass
class PointRun(StageRun):
    """A fine-tune: its randomness is fine-tuning's own (round 0), the same whichever round it
    follows; its rows name that round (`point`, a chain's T'), so a chain's fine-tunes differ."""

    point: int = 0

    def row(self, step: int) -> dict:
        return {**super().row(step), "round": self.point}


def _fresh(cfg: TrialConfig, task: Task, init: nn.Module, hooks: Hooks) -> TrialState:
    # Rank 0's key for all: ranks may hash what they loaded differently (files copied to
    # each node with other mtimes), and every rank must load the same artifacts.
    key = init_key(init, task) if hooks.rank == 0 else ""
    return TrialState(theta_key=_from_rank0(key, hooks))


def _resumed(saved: dict, plan: list[tuple[str, int]]) -> TrialState:
    """A restarted worker group: the saved state, and where it picked up in the summary."""
    state = TrialState.from_dict(saved)
    stage, round_ = plan[state.stage_index]
    step = state.mid_stage.step if state.mid_stage else 0
    state.summary["restarts"] = state.summary.get("restarts", 0) + 1
    state.summary["resumed_from"] = f"{stage} round {round_} step {step}"
    return state


class Ledger:
    """The trial's summary: per-stage seconds and steps, artifact keys, reuse, early signals,
    and the final metrics. Seconds add up over restarts of a stage."""

    def __init__(self, summary: dict):
        self.summary = summary

    @contextlib.contextmanager
    def stage(self, name: str, steps: int):
        entry = _Entry(self.summary, name)
        started = time.perf_counter()
        yield entry
        seconds = time.perf_counter() - started
        self.summary[f"seconds_{name}"] = self.summary.get(f"seconds_{name}", 0.0) + seconds
        self.summary[f"steps_{name}"] = steps
        if entry.trained:  # compute this trial spent on training, as opposed to loading artifacts
            self.summary["trained_seconds"] = self.summary.get("trained_seconds", 0.0) + seconds

    def finish(self, metrics: dict) -> None:
        self.summary.update(metrics)


@dataclasses.dataclass
class _Entry:
    summary: dict
    name: str
    trained: bool = True

    def artifact(self, key: str, last: dict) -> None:
        self.summary[f"key_{self.name}"], self.summary[f"reused_{self.name}"] = key, not self.trained
        if "knn_accuracy" in last:
            self.summary[f"knn_accuracy_{self.name}"] = last["knn_accuracy"]


def reuse_or_train(key: str, inputs: dict, run: StageRun, task: Task, init: nn.Module,
                   train: Callable[[], tuple[dict, dict]]) -> tuple[dict, dict, bool]:
    """A pre-training stage's output: loaded when its artifact exists, else trained under the
    artifact's lease (waiting while another trial trains it) and saved. Every rank takes part.
    -> (theta, last row with its early signal, trained)"""
    hooks, store = run.hooks, run.hooks.artifacts

    def trained() -> tuple[dict, dict]:
        theta, last = train()
        return theta, {**last, **_signal(init, theta, task, run)}

    if store is None:
        return (*trained(), True)
    if _agree(store, key, run) == "ready":
        theta, meta = store.load(key)
        last = {**meta["row"], **run.row(getattr(run.cfg, run.stage).steps)}
        # Recomputed when the builder's signal is not this trial's (off, or on other examples);
        # decided by all ranks together, as it runs collectives.
        stale = torch.tensor([float(meta.get("signal") != signal_id(run.cfg))], device=hooks.device)
        if hooks.all_reduce(stale).item() > 0:
            last = {k: v for k, v in last.items() if k != "knn_accuracy"}
            last.update(_signal(init, theta, task, run))
        return theta, last, False
    started = time.perf_counter()
    with store.building(key) if hooks.rank == 0 else contextlib.nullcontext():
        theta, last = trained()
        if hooks.rank == 0:
            store.save(key, theta, {"key": key, "inputs": inputs, "row": last,
                                    "signal": signal_id(run.cfg),
                                    "seconds": time.perf_counter() - started,
                                    "built_by": store.owner, "raysd_version": __version__})
    return theta, last, True


def _agree(store, key: str, run: StageRun) -> str:
    """Rank 0 asks the store; every rank gets its answer ("ready" or "build"), waiting together
    while another trial holds the lease."""
    hooks = run.hooks
    told = False
    while True:
        code = torch.zeros(1, device=hooks.device)
        if hooks.rank == 0:
            code += DECISIONS.index(store.claim(key)) + 1
        decision = DECISIONS[int(hooks.all_reduce(code).item()) - 1]
        if decision != "wait":
            return decision
        if hooks.rank == 0 and not told:
            print(f"raysd: {stage_name(run.stage, run.round)}: waiting for "
                  f"{store.lease_holder(key) or 'another trial'}, which trains the same stage "
                  f"(artifact {key})", flush=True)
            told = True
        time.sleep(POLL_SECONDS)


def _from_rank0(text: str, hooks: Hooks) -> str:
    """Rank 0's (ASCII) string on every rank, through the all-reduce the hooks offer."""
    if hooks.world_size == 1:
        return text
    data = torch.zeros(128, dtype=torch.long, device=hooks.device)
    if hooks.rank == 0:
        data[: len(text)] = torch.tensor(list(text.encode()), device=hooks.device)
    hooks.all_reduce(data)
    return bytes(data[data > 0].tolist()).decode()


def signal_id(cfg: TrialConfig) -> str | None:
    """What makes two early signals of one artifact comparable: the settings declared to change
    the signal beyond those already in the artifact's key (its kind, the examples it reads)."""
    if cfg.evaluation.signal == "none":
        return None
    keyed = key_inputs(cfg, "further_pretrain")
    return digest({k: v for k, v in key_inputs(cfg, "signal").items() if k not in keyed})


def _signal(init: nn.Module, theta: dict, task: Task, run: StageRun) -> dict:
    if run.cfg.evaluation.signal == "none":
        return {}
    model = copy.deepcopy(init)
    model.load_state_dict(theta)
    return knn_signal(model.to(run.hooks.device), task, run)


def init_key(init: nn.Module, task: Task) -> str:
    """The key of theta_init on this task: the root of every stage key of the trial. The
    method's code and the libraries it runs on are part of it, so neither a change to a stage
    nor an upgrade of torch reuses what was built before."""
    return digest({"code": code_version(), "libraries": library_versions(), "layout": LAYOUT,
                   "theta_init": state_hash(init.state_dict()), "data": task.source,
                   "data_fingerprint": task.fingerprint})


def stage_key(parent: str, cfg: TrialConfig, stage: str, round_: int, hooks: Hooks, task: Task
              ) -> tuple[str, dict]:
    """(key, what it was made of) for a pre-training stage: its parent's key and every setting
    the schema declares able to change its output, as it resolves in this run (`cfg` is the
    trial's cfg.effective(): a method is keyed as the settings it runs under)."""
    on_gpu = hooks.device.type == "cuda"
    resolved: dict = {"precision": cfg.precision if on_gpu else "fp32",
                      "max_length": cfg.max_length if task.modality == "text" else None,
                      "image_resize": cfg.image_resize if task.source.startswith("imagefolder:") else None}
    if stage == "self_distill":
        distill = cfg.self_distill
        cached = uses_cache(distill.teacher_cache, distill.steps * distill.batch_size, len(task.unlabelled))
        resolved["self_distill.teacher_cache"] = "on" if cached else "off"
        if distill.target != "representation":  # only f_teacher(x) is ever cached
            resolved["self_distill.teacher_cache"] = None
        if not cached or distill.target != "representation":
            resolved["evaluation.batch_size"] = None  # only cached targets are computed in batches
    inputs = {
        "parent": parent, "stage": stage, "round": round_,
        "settings": key_inputs(cfg, stage, resolved),
        # Ranks draw their own masks, and kernels round differently per device.
        "world_size": hooks.world_size,
        "device": torch.cuda.get_device_name(hooks.device) if on_gpu else "cpu",
    }
    return digest(inputs), inputs


def agreed_stage_key(parent: str, cfg: TrialConfig, stage: str, round_: int, hooks: Hooks,
                     task: Task) -> tuple[str, dict]:
    """Rank 0's stage key on every rank (and its inputs on rank 0, which saves them)."""
    key, inputs = stage_key(parent, cfg, stage, round_, hooks, task) if hooks.rank == 0 else ("", {})
    return _from_rank0(key, hooks), inputs
