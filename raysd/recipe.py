"""THE METHOD (Lee et al., ICLR 2023), free of Ray: one trial, read top to bottom as Algorithm 1.

  theta_0 = further_pretrain(theta_init, D_u)                                  (Alg. 2)
  for t in 1..T':  theta_t = self_distill_round(theta_init, teacher=theta_{t-1}, D_u)
  metrics = finetune_and_evaluate(theta_T', D_tr)  -> val and test metrics (and the model,
                                                      kept when the caller's hooks save it)

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

import torch
from torch import nn

from raysd import __version__
from raysd.artifacts import METHOD_VERSION, digest, state_hash
from raysd.config import TrialConfig
from raysd.data import Task
from raysd.stages import (Hooks, NonFiniteLoss, StageProgress, StageRun, finetune_and_evaluate,
                          further_pretrain, knn_signal, self_distill_round)

__all__ = ["Hooks", "NonFiniteLoss", "TrialState", "run_trial", "init_key", "stage_key"]
POLL_SECONDS = 5.0  # how often a trial waiting for another's artifact looks again
DECISIONS = ("ready", "build", "wait")


@dataclasses.dataclass
class TrialState:
    """Where a trial stands. Every checkpoint saves it; a restarted worker group resumes it."""

    stage_index: int = 0  # the stage running, or next, in cfg.stages()
    theta: dict | None = None  # output of the last finished pre-training stage: the next teacher
    theta_key: str | None = None  # its artifact key (theta_init's key before any stage)
    summary: dict = dataclasses.field(default_factory=dict)  # per-stage cost, keys, signals
    progress: StageProgress | None = None  # the running stage's own state, mid-stage

    def to_dict(self) -> dict:
        """Tensors and plain values only, so it loads with torch.load(weights_only=True)."""
        out = {"stage_index": self.stage_index, "theta": self.theta, "theta_key": self.theta_key,
               "summary": self.summary}
        if self.progress is not None:
            out["progress"] = dataclasses.asdict(self.progress)
        return out

    @classmethod
    def from_dict(cls, doc: dict) -> "TrialState":
        progress = doc.get("progress")
        return cls(doc["stage_index"], doc["theta"], doc["theta_key"], doc["summary"],
                   StageProgress(**progress) if progress else None)


def stage_name(stage: str, round_: int) -> str:
    return f"self_distill_{round_}" if stage == "self_distill" else stage


def run_trial(cfg: TrialConfig, task: Task, init: nn.Module, hooks: Hooks) -> dict:
    """Run every stage of cfg.method from theta_init (`init`, never modified); return the
    trial's summary: final metrics, per-stage seconds, artifact keys, reuse and signals."""
    plan = cfg.stages()
    if hooks.resume is not None:  # a restarted worker group: say where it picked up
        state = TrialState.from_dict(hooks.resume)
        stage, round_ = plan[state.stage_index]
        step = state.progress.step if state.progress else 0
        state.summary["restarts"] = state.summary.get("restarts", 0) + 1
        state.summary["resumed_from"] = f"{stage} round {round_} step {step}"
    else:
        # Rank 0's key for all: ranks may hash what they loaded differently (files copied to
        # each node with other mtimes), and every rank must load the same artifacts.
        key = init_key(cfg, init, task) if hooks.rank == 0 else ""
        state = TrialState(theta_key=_from_rank0(key, hooks))
    summary = state.summary

    for index in range(state.stage_index, len(plan)):
        stage, round_ = plan[index]
        name = stage_name(stage, round_)
        state.stage_index = index
        offset = sum(getattr(cfg, s).steps for s, _ in plan[:index])
        run = StageRun(cfg, hooks, stage, round_, offset, resume=state.progress,
                       checkpoint=lambda p: dataclasses.replace(state, progress=p).to_dict())
        state.progress = None
        started = time.perf_counter()
        if stage == "finetune":
            last, final, classifier = finetune_and_evaluate(init, state.theta or init.state_dict(),
                                                            task, run)
            summary.update(final)
            if hooks.save_model is not None and hooks.rank == 0:
                # Before the last report, so a finished trial always has its model; a worker
                # group that restarts before that report fine-tunes again and saves again.
                hooks.save_model(classifier, final)
            trained = True
        else:
            key, inputs = stage_key(state.theta_key, cfg, stage, round_, hooks)
            theta, last, trained = _pretrain(init, state.theta, task, run, key, inputs)
            state.theta, state.theta_key = theta, key
            last["stages_done"] = index + 1
            summary[f"key_{name}"], summary[f"reused_{name}"] = key, not trained
            if "knn_accuracy" in last:
                summary[f"knn_accuracy_{name}"] = last["knn_accuracy"]
        seconds = time.perf_counter() - started
        summary[f"seconds_{name}"] = summary.get(f"seconds_{name}", 0.0) + seconds
        summary[f"steps_{name}"] = getattr(cfg, stage).steps
        if trained:  # compute this trial spent on training, as opposed to loading artifacts
            summary["trained_seconds"] = summary.get("trained_seconds", 0.0) + seconds
        if index + 1 < len(plan):
            # Stage boundary: checkpoint so a restart never repeats a finished stage.
            state.stage_index = index + 1
            hooks.report({**last, **summary}, state.to_dict())  # a trial stopped here keeps them
    hooks.report({**last, **summary, "trial_done": True}, None)
    return summary


def _pretrain(init: nn.Module, teacher: dict | None, task: Task, run: StageRun, key: str,
              inputs: dict) -> tuple[dict, dict, bool]:
    """One pre-training stage, loaded when its artifact exists. -> (theta, last row, trained)"""
    hooks, store = run.hooks, run.hooks.artifacts

    def train() -> tuple[dict, dict]:
        if run.stage == "further_pretrain":
            theta, last = further_pretrain(init, task.unlabelled, run)
        else:
            theta, last = self_distill_round(init, teacher, task.unlabelled, run)
        return theta, {**last, **_signal(init, theta, task, run)}

    if store is None:
        return (*train(), True)
    if _agree(store, key, run) == "ready":
        theta, meta = store.load(key)
        last = {**meta["row"], **run.row(getattr(run.cfg, run.stage).steps)}
        # Recomputed when the builder's signal is not this trial's (off, or on other examples);
        # decided by all ranks together, as it runs collectives.
        stale = torch.tensor([float(meta.get("signal") != _signal_id(run.cfg))], device=hooks.device)
        if hooks.all_reduce(stale).item() > 0:
            last = {k: v for k, v in last.items() if k != "knn_accuracy"}
            last.update(_signal(init, theta, task, run))
        return theta, last, False
    started = time.perf_counter()
    with store.building(key) if hooks.rank == 0 else contextlib.nullcontext():
        theta, last = train()
        if hooks.rank == 0:
            store.save(key, theta, {"key": key, "inputs": inputs, "row": last,
                                    "signal": _signal_id(run.cfg),
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


def _signal_id(cfg: TrialConfig) -> str | None:
    """What makes two early signals comparable: the kind and the examples it looks at."""
    return None if cfg.signal == "none" else f"{cfg.signal}:{cfg.signal_examples}"


def _signal(init: nn.Module, theta: dict, task: Task, run: StageRun) -> dict:
    if run.cfg.signal == "none":
        return {}
    model = copy.deepcopy(init)
    model.load_state_dict(theta)
    return knn_signal(model.to(run.hooks.device), task, run)


def init_key(cfg: TrialConfig, init: nn.Module, task: Task) -> str:
    """The key of theta_init on this task: the root of every stage key of the trial."""
    return digest({"method_version": METHOD_VERSION, "model": cfg.model, "weights": cfg.weights,
                   "theta_init": state_hash(init.state_dict()), "data": task.source,
                   "data_fingerprint": task.fingerprint,
                   "max_length": cfg.max_length if task.modality == "text" else None})


def stage_key(parent: str, cfg: TrialConfig, stage: str, round_: int, hooks: Hooks
              ) -> tuple[str, dict]:
    """(key, what it was made of) for a pre-training stage: everything its output depends on."""
    inputs = {
        "parent": parent, "stage": stage, "round": round_,
        "settings": dataclasses.asdict(getattr(cfg, stage)),
        "mask_ratio": cfg.mask_ratio, "seed": cfg.seed,
        # Ranks draw their own masks, and kernels round differently per device and precision.
        "world_size": hooks.world_size,
        "precision": cfg.precision if hooks.device.type == "cuda" else "fp32",
        "device": torch.cuda.get_device_name(hooks.device) if hooks.device.type == "cuda" else "cpu",
    }
    if stage == "self_distill":
        inputs.update(mae_weight=cfg.mae_weight, teacher_cache=cfg.teacher_cache)
        if cfg.teacher_cache != "off":  # the cached targets' batch shape, which kernels see
            inputs["teacher_batch"] = cfg.eval_batch_size
    return digest(inputs), inputs
