"""A trial's processes that do not train (its Tune driver, Ray Train's controller) load no torch:
what Ray ships them, unpickled in a fresh interpreter, and the trial's config built from it
import none (issue 22: ~480 MB and ~2 s per process and trial)."""
import os
import subprocess
import sys

import pytest

LOADS = """
import sys
import ray.cloudpickle as pickle
trial_driver, space, backend, loop = pickle.loads(sys.stdin.buffer.read())
assert backend.backend_cls.share_cuda_visible_devices
cfg = space.trial_config({})  # what trial_driver builds before its Train run
cfg.worker_resources(), cfg.effective()
print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "timm")))
"""
DUMPS = """
import sys
import ray.cloudpickle as pickle
from raysd.ddp import DDP, train_loop
from raysd.spaces import load_space
from raysd.trial import trial_driver
space = load_space("demo")
assert "torch" not in sys.modules  # the Tune driver process (study.py) imports raysd.trial too
sys.stdout.buffer.write(pickle.dumps((trial_driver, space, DDP(), train_loop)))
"""


def _python(code: str, stdin: bytes = b"") -> bytes:
    done = subprocess.run([sys.executable, "-c", code], input=stdin, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    return done.stdout


def test_the_trial_driver_and_its_backend_unpickle_without_torch():
    blob = _python(DUMPS)
    assert _python(LOADS, blob).decode().strip() == "[]"



def test_a_retried_driver_reraises_its_trials_failure_and_resume_runs_it_again(tmp_path, monkeypatch):
    """Tune restarts a trial whose driver died (its node was lost) under the same Tune trial id:
    a trial that had failed for good raises its error again without training; a --resume (a
    new Tune trial id) trains it again."""
    from raysd import trial
    from raysd.spaces import load_space

    trained, attempt = [], {"id": "tune_a"}
    monkeypatch.setattr(trial.tune, "get_context",
                        lambda: type("Ctx", (), {"get_trial_id": lambda self: attempt["id"]})())

    def train(cfg, space, name, run_uri, *rest):
        trained.append(attempt["id"])
        raise trial.TrialFailed("NonFiniteLoss on rank 0: loss is nan")

    monkeypatch.setattr(trial, "_train", train)
    run = lambda: trial.trial_driver({"trial_id": "t0"}, load_space("demo"), str(tmp_path), None, None)  # noqa: E731
    for _ in range(2):  # the first run, then Tune's retry of it
        try:
            run()
        except trial.TrialFailed as err:
            assert str(err) == "NonFiniteLoss on rank 0: loss is nan"
        else:
            raise AssertionError("the trial did not fail")
    assert trained == ["tune_a"]
    attempt["id"] = "tune_b"  # --resume: a fresh Tuner
    try:
        run()
    except trial.TrialFailed:
        pass
    assert trained == ["tune_a", "tune_b"]


@pytest.mark.parametrize("janitor", [None, "the study's janitor"])
def test_a_trials_train_run_starts_no_ray_data_manager_and_no_preemption_watcher(tmp_path, monkeypatch, janitor):
    """raysd's ranks load their own data and checkpoint on a schedule: the Train run a trial's
    driver starts has no Ray Data callback (its DatasetManager actor) and turns off Ray Train's
    PreemptionWatcher actor, which the controller reads from the driver's environment. Given
    the study's janitor, its guard replaces Ray Train's PlacementGroupCleaner actor."""
    from ray.train.v2._internal.callbacks import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    from ray.train.v2.api.callback import UserCallback
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from raysd import trial
    from raysd.spaces import load_space

    seen = {}

    def fit(self):  # what the controller would be started with
        seen["callbacks"] = [type(c).__name__ for c in self._create_default_callbacks()]
        seen["watcher"] = os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")

    monkeypatch.setattr(DataParallelTrainer, "fit", fit)
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "unset")  # undone after the test
    monkeypatch.delenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")
    monkeypatch.setattr(trial, "_let_tune_take_the_last_report", lambda: None)
    monkeypatch.setattr(trial, "TuneReportCallback", UserCallback)  # outside a Tune session
    monkeypatch.setattr(trial.tune, "get_context",
                        lambda: type("Ctx", (), {"get_trial_id": lambda self: "tune_a"})())
    trial.trial_driver({"trial_id": "t0"}, load_space("demo"), str(tmp_path), None, None, janitor)
    assert "BackendSetupCallback" in seen["callbacks"], seen["callbacks"]  # raysd's DDP set-up
    assert DatasetsCallback.__name__ not in seen["callbacks"], seen["callbacks"]
    assert seen["watcher"] == "0"
    cleaners = [c for c in seen["callbacks"] if c in (PlacementGroupCleanerCallback.__name__, "_PlacementGroupGuard")]
    assert cleaners == (["_PlacementGroupGuard"] if janitor else [PlacementGroupCleanerCallback.__name__])


def test_the_study_driver_records_without_torch(tmp_path):
    """The study's own driver (raysd tune: the Tuner, the recorder's Parquet and TensorBoard
    writers) loads torch only to build the built-in demo weights; a space on other weights never."""
    code = f"""
import sys
import raysd.study
from raysd.spaces import load_space
from raysd.storage import Store
from raysd.writers import ResultsWriter, TensorBoardWriter
space = load_space("demo", {{"weights": "none"}})
tb = TensorBoardWriter(space, Store({str(tmp_path)!r}), None)
tb.experiment()
tb.scalars("t1", {{"stage": "finetune", "round": 0, "progress": 1, "loss": 0.5}})
tb.hparams("t1", {{}}, {{"val_accuracy": 0.5, "progress": 1}}, "completed")
tb.close()
assert "torch" not in sys.modules, "torch"
"""
    _python(code)
    assert list((tmp_path / "tensorboard" / "t1").iterdir())
