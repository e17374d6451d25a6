"""Shared fixtures: tiny configs and one real local Ray per test session, on loopback."""
from __future__ import annotations

import os
import tempfile

# Keep every Ray node of the tests on loopback (Ray otherwise picks the network interface).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Tests build their own tokenizer and demo weights, never touching the user's cache.
os.environ["RAYSD_CACHE"] = tempfile.mkdtemp(prefix="raysd-test-cache-")

import pytest  # noqa: E402

from raysd.config import StageConfig, TrialConfig  # noqa: E402


def tiny_config(**overrides) -> TrialConfig:
    """A ViT trial small enough for a unit test on one CPU core."""
    stage = StageConfig(steps=4, batch_size=16, lr=1e-3, beta2=0.95)
    base = dict(model="vit_tiny", weights="none", data="builtin:digits", further_pretrain=stage,
                self_distill=stage, finetune=StageConfig(steps=4, batch_size=16, lr=1e-3,
                                                         warmup_steps=2, grad_clip=1.0),
                eval_batch_size=512, log_every=2, checkpoint_every=2, signal_examples=256)
    base.update(overrides)
    return TrialConfig(**base)


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
