"""Ray Train's torch DDP backend, importable without torch.

`ray.train.torch.TorchConfig` imports torch at module level, and Ray Train unpickles the backend
config in every trial's driver and TrainController: two processes per trial that never train
would each load torch (~480 MB and ~2 s here). `DDP` does what TorchConfig does for raysd's
trials (gloo on CPUs, NCCL on GPUs, `env://` rendezvous on rank 0's address, each rank's
CUDA device set before its loop) and leaves every torch call to the ranks: the functions it
sends them import Ray's own torch set-up there."""
from __future__ import annotations

import dataclasses
import os

import ray
from ray.train._internal.utils import get_address_and_port
from ray.train.backend import Backend, BackendConfig
from ray.train.v2._internal.util import TrainingFramework

# A rank waits this long in a collective before the process group fails it (TorchConfig's too).
TIMEOUT_S = 1800


def train_loop(config: dict) -> None:
    """The ranks' loop (raysd.train.train_worker), named here so pickling it imports no torch."""
    from raysd.train import train_worker

    train_worker(config)


@dataclasses.dataclass
class DDP(BackendConfig):
    timeout_s: int = TIMEOUT_S

    @property
    def backend_cls(self):
        return _DDPBackend

    @property
    def train_func_context(self):
        return _RankDevice

    @property
    def framework(self):
        return TrainingFramework.TORCH

    def to_dict(self) -> dict:
        return {"timeout_s": self.timeout_s}


class _DDPBackend(Backend):
    share_cuda_visible_devices: bool = True  # as TorchConfig's: a node's ranks see its GPUs

    def on_start(self, worker_group, backend_config: DDP) -> None:
        backend = "nccl" if worker_group.get_resources_per_worker().get("GPU", 0) > 0 else "gloo"
        address, port = worker_group.execute_single(0, get_address_and_port)
        world = len(worker_group)
        ray.get([worker_group.execute_single_async(rank, _join, backend=backend, world_rank=rank,
                                                   world=world, address=address, port=port,
                                                   timeout_s=backend_config.timeout_s)
                 for rank in range(world)])

    def on_shutdown(self, worker_group, backend_config: DDP) -> None:
        from ray.exceptions import GetTimeoutError
        from ray.train.constants import (DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
                                         TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S)

        timeout = float(os.environ.get(TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
                                       DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S))
        try:
            ray.get(worker_group.execute_async(_leave, destroy=len(worker_group) > 1), timeout=timeout)
        except GetTimeoutError:
            pass  # a rank that cannot leave its group is ended with its process


def _join(backend: str, world_rank: int, world: int, address: str, port: int, timeout_s: int) -> None:
    """On a rank: Ray's own torch environment (RANK, LOCAL_RANK, ...) and process group."""
    from ray.train.torch.config import _set_torch_distributed_env_vars, _setup_torch_process_group

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = address, str(port)
    _set_torch_distributed_env_vars()
    _setup_torch_process_group(backend, world_rank, world, "env://", timeout_s)


def _leave(destroy: bool) -> None:
    from ray.train.torch.config import _shutdown_torch

    _shutdown_torch(destroy_process_group=destroy)


class _RankDevice:
    """Around each rank's loop: its CUDA device is the current one (TorchConfig's context)."""

    def __enter__(self):
        from ray.train.torch.config import TorchConfigContextManager

        TorchConfigContextManager().__enter__()

    def __exit__(self, *exc) -> bool:
        return False
