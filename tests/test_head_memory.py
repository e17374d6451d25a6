"""How much memory each concurrent trial costs the head node: benchmarks/head_memory.py at 2
concurrent trials, on a cluster of its own (a 0-CPU head and two 1-CPU worker nodes, started and
ended by the benchmark). No session cluster fits: two_nodes' head has a CPU, so training could
land there and count as the head's."""
import importlib.util
from pathlib import Path

# A trial's driver (ImplicitFunc) runs on a worker node offering raysd_driver, and Ray Train puts
# its controller and helpers beside it; the head keeps one process per study, raysd's janitor
# (~200 MB RSS: ~100 MB per trial at 2 trials, measured). Ray Train's PlacementGroupCleaner, one
# per trial pinned to the head by Ray (~200 MB each), would make it ~200 MB per trial; drivers
# back on the head >1,300 MB per trial, and 2,300 MB with torch.
HEAD_MB_PER_TRIAL_BOUND = 160
# A trial's non-training processes together, wherever they run: measured ~735 MB RSS (~435 MB
# PSS) here; CI's machine measured ~20 % more per Ray process. Four Ray processes at ~125-210 MB
# each; torch back in the driver and controller adds ~940 MB, Ray Train's Ray Data manager and
# preemption watcher ~240 MB each, its PlacementGroupCleaner ~200 MB.
TRIAL_MB_BOUND = 1200
# The trial driver and Ray Train's controller, each: ~210 MB RSS here, ~250 MB on CI; with torch
# imported ~690 MB (measured before raysd/trial.py), so torch in either one fails this.
NO_TORCH_PROCESS_MB_BOUND = 450


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
    # Ray Train's actors that raysd's trials have no use for are not started (raysd/trial.py).
    assert not {"DatasetManager", "PreemptionWatcher", "PlacementGroupCleaner"} & set(result["classes"]), (
        head_memory.table(result))
    assert result["classes"]["PlacementGroupJanitor"]["nodes"] == ["head"], head_memory.table(result)
    for driver_side in ("ImplicitFunc", "TrainController"):
        assert result["classes"][driver_side]["rss_per_trial"] <= NO_TORCH_PROCESS_MB_BOUND, (
            driver_side, head_memory.table(result))
    assert 0 < result["trial_mb"] <= TRIAL_MB_BOUND, head_memory.table(result)
    assert result["head_mb_per_trial"] <= HEAD_MB_PER_TRIAL_BOUND, head_memory.table(result)
