"""How much memory each concurrent trial costs the head node: benchmarks/head_memory.py at 2
concurrent trials, on a cluster of its own (a 0-CPU head and two 1-CPU worker nodes, started and
ended by the benchmark). No session cluster fits: two_nodes' head has a CPU, so training could
land there and count as the head's."""
import importlib.util
from pathlib import Path

# Today each trial's driver (ImplicitFunc), Ray Train's TrainController and its helper actors all
# run on the head (study.DRIVER_BUNDLE pins the driver there, and Ray Train places its actors
# beside the driver): about 2.4 GB of Ray worker RSS on the head per concurrent trial (demo ViT,
# CPU torch). Generous; to be tightened once trial drivers move to worker nodes (their
# `raysd_driver` resource), when the head should pay next to nothing per trial.
HEAD_MB_PER_TRIAL_BOUND = 4000


def _benchmark():
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "head_memory.py"
    spec = importlib.util.spec_from_file_location("head_memory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_head_memory_per_concurrent_trial():
    head_memory = _benchmark()
    # One stage (fine-tuning) instead of the smoke run's three: the same processes, less waiting.
    result = head_memory.measure(2, cpus_per_node=1, extra=["--set", "method=finetune"])
    print(head_memory.table(result))
    # It measured what it claims: both trials at once, their training on the worker nodes only
    # (the head has no CPU), their non-training processes seen.
    assert result["drivers_at_once"] == 2, result["log"][-3000:]
    assert set(result["classes"]["RayTrainWorker"]["nodes"]) <= {"w1", "w2"}
    assert {"ImplicitFunc", "TrainController"} <= set(result["classes"])
    assert result["trial_mb"] > 0
    assert result["head_mb_per_trial"] <= HEAD_MB_PER_TRIAL_BOUND, head_memory.table(result)
