"""One actor per study that frees the placement groups of trials whose Ray Train controller died.

A trial's training workers live in a placement group its Ray Train controller creates. The
controller removes it when the run ends; when the controller dies instead (Tune stopped the
trial - ASHA, Ctrl-C - or the node under it went away), Ray removes a placement group only once
both its creator actor and its creator job are gone, and the job is the study: the group would
hold its nodes' CPUs and GPUs until the study ends. Ray Train guards against that with a
PlacementGroupCleaner actor per run, pinned to the head (~200 MB each, so the head grows by
that per concurrent trial). raysd's trials register their groups with this one actor instead
(trial._PlacementGroupGuard): the head holds one more process per study, whatever its width.

The janitor asks each registered controller whether it lives (Ray's built-in `__ray_ready__`
call, answered by any live actor; no State API, so no dashboard needed) every `interval_s`, and
removes the groups of each one Ray reports dead. It is owned by the study's driver and ends with
it; Ray then removes what the study's actors created, as the job is gone too.
"""
from __future__ import annotations

import logging
import threading
import time

import ray
from ray.exceptions import ActorDiedError
from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

logger = logging.getLogger(__name__)

INTERVAL_S = 1.0  # Ray Train's own cleaner checks once a second too


class PlacementGroupJanitor:
    """Registered controllers (by actor id) with their handles and placement groups; a thread
    checks them."""

    def __init__(self, interval_s: float = INTERVAL_S):
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._guarded: dict[str, tuple[ray.actor.ActorHandle, list[PlacementGroup]]] = {}
        self._removed: list[str] = []  # the ids of the groups it removed, oldest first
        self._retry: list[PlacementGroup] = []  # groups a removal failed for: tried each round
        if ray.get_runtime_context().was_current_actor_reconstructed:
            logger.warning("raysd: the placement group janitor restarted; trials registered before "
                           "are no longer guarded (their groups are freed when the study ends)")
        threading.Thread(target=self._watch, name="raysd-janitor", daemon=True).start()

    def guard(self, controller_id: str, controller: ray.actor.ActorHandle, group: PlacementGroup) -> None:
        """The controller created `group` (a worker group's start, first or after a restart)."""
        with self._lock:
            self._guarded.setdefault(controller_id, (controller, []))[1].append(group)

    def release(self, controller_id: str) -> None:
        """The controller is shutting down of its own accord and removes its groups itself."""
        with self._lock:
            self._guarded.pop(controller_id, None)

    def guarded(self) -> dict[str, list[str]]:
        """controller id -> the ids of its groups it watches."""
        with self._lock:
            return {key: [g.id.hex() for g in groups] for key, (_, groups) in self._guarded.items()}

    def removed(self) -> list[str]:
        """The ids of the groups it removed, oldest first."""
        with self._lock:
            return list(self._removed)

    def drain(self, timeout_s: float) -> list[str]:
        """Wait until every guarded controller has ended (released, or dead and freed), at most
        `timeout_s`; the ids of those still guarded."""
        deadline = time.monotonic() + timeout_s
        while (self.guarded() or self._retry) and time.monotonic() < deadline:
            time.sleep(self.interval_s / 4)
        return list(self.guarded())

    def _watch(self) -> None:
        pings: dict[str, ray.ObjectRef] = {}  # a check under way per controller
        while True:
            time.sleep(self.interval_s)
            try:
                self._check(pings)
            except Exception:  # noqa: BLE001 - a GCS hiccup must not end the watch
                logger.exception("raysd: placement group janitor")

    def _check(self, pings: dict[str, ray.ObjectRef]) -> None:
        """One round: ask each guarded controller not being asked already; free the dead ones'."""
        with self._lock:
            guarded, retry, self._retry = dict(self._guarded), self._retry, []
        self._remove(retry)
        for key in set(pings) - set(guarded):  # released meanwhile
            del pings[key]
        answered = set()
        if pings:
            answered = set(ray.wait(list(pings.values()), num_returns=len(pings), timeout=0)[0])
        for key, (controller, _) in guarded.items():
            ping = pings.get(key)
            if ping is None:
                pings[key] = controller.__ray_ready__.remote()
            elif ping in answered:  # unanswered: a busy controller is alive until Ray says not
                del pings[key]
                try:
                    ray.get(ping)
                except ActorDiedError:
                    self._free(key)
                except Exception:  # noqa: BLE001 - unreachable for now (a node's network)
                    pass

    def _free(self, key: str) -> None:
        with self._lock:
            _, groups = self._guarded.pop(key, (None, []))
        self._remove(groups)

    def _remove(self, groups: list[PlacementGroup]) -> None:
        """Remove these groups but those already removed; a failure (a GCS restart, say) is
        tried again next round."""
        for group in groups:
            try:
                if placement_group_table(group).get("state", "REMOVED") == "REMOVED":
                    continue  # removed by the controller before it died (a worker group's restart)
            except Exception:  # noqa: BLE001 - unknown: removing a removed group does no harm
                pass
            try:
                remove_placement_group(group)
            except Exception as err:  # noqa: BLE001 - one group's failure must not stop the rest
                logger.warning("raysd: could not remove placement group %s (%s); trying again",
                               group.id.hex(), err)
                with self._lock:
                    self._retry.append(group)
                continue
            with self._lock:
                self._removed.append(group.id.hex())


def start_janitor() -> ray.actor.ActorHandle:
    """The study's janitor, on the head (the one node that never goes away), owned by this
    driver; it takes no CPU. Restarted if its process dies (it then guards what registers anew)."""
    from raysd.cluster import HEAD_DRIVER

    actor = ray.remote(num_cpus=0, max_restarts=-1, max_concurrency=4)(PlacementGroupJanitor)
    return actor.options(resources=dict(HEAD_DRIVER)).remote()


DRAIN_S = 60.0  # a stopped trial's controller dies within seconds of its trial's driver


def stop_janitor(janitor: ray.actor.ActorHandle, timeout_s: float = DRAIN_S) -> None:
    """At the study's end: once the trials' controllers have all ended (Tune has stopped the
    last ones on Ctrl-C, and they die as their drivers do), end the janitor."""
    try:
        left = ray.get(janitor.drain.remote(timeout_s), timeout=timeout_s + 10)
        if left:
            logger.warning("raysd: %d trial controller(s) still running at the study's end; their "
                           "placement groups are freed when this driver exits", len(left))
    except ray.exceptions.RayError:
        pass  # it died with its node, or does not answer: nothing more to wait for
    finally:
        ray.kill(janitor, no_restart=True)
