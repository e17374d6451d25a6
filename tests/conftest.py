"""Shared fixtures: tiny configs and one real local Ray per test session, on loopback."""
from __future__ import annotations

import os
import tempfile

# Keep every Ray node of the tests on loopback (Ray otherwise picks the network interface).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Tests build their own tokenizer and demo weights, never touching the user's cache.
os.environ["RAYSD_CACHE"] = tempfile.mkdtemp(prefix="raysd-test-cache-")

import pytest  # noqa: E402

from raysd import config, schema  # noqa: E402
from raysd.config import TrialConfig  # noqa: E402

TINY_STAGE = {"steps": 4, "batch_size": 16, "lr": 1e-3}
TINY = {"model": "vit_tiny", "weights": "none", "data": "builtin:digits",
        "further_pretrain": TINY_STAGE, "self_distill": TINY_STAGE,
        "finetune": {**TINY_STAGE, "warmup_steps": 2},
        "evaluation": {"batch_size": 512, "signal_examples": 256},
        "logging": {"log_every": 2, "checkpoint_every": 2}}


def tiny_config(values: dict | None = None, /, **top) -> TrialConfig:
    """A ViT trial small enough for a unit test on one CPU core, with settings changed by
    dotted name (`{"self_distill.rounds": 2}`) or, for top-level ones, by keyword."""
    cfg = schema.with_values(schema.parse(TrialConfig, TINY, "tiny_config"), {**(values or {}), **top},
                             "tiny_config")
    config.check(cfg, "tiny_config")
    return cfg


@pytest.fixture(scope="session")
def digits():
    from raysd.data import load_task

    return load_task("builtin:digits", image_size=32)


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """One isolated local Ray for every test that needs it (starting Ray costs seconds)."""
    import ray

    from raysd.cluster import start_local_ray

    start_local_ray(num_cpus=3, log_to_driver=False, _temp_dir=str(tmp_path_factory.mktemp("ray")))
    yield ray
    ray.shutdown()


@pytest.fixture
def marked_env():
    """An environment whose RAY_TMPDIR marks every process started with it; they end with the test."""
    from helpers import kill_processes_mentioning

    marker = tempfile.mkdtemp(prefix="rsj", dir="/tmp")  # short: socket paths are length-limited
    env = {**os.environ, "RAY_TMPDIR": marker, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    yield env
    kill_processes_mentioning(marker)
