"""The study's placement-group janitor (raysd/janitor.py) on the session's real Ray: the group of a
trial controller that died is removed while the study goes on; a live or released one's is not."""
from __future__ import annotations

import time

from helpers import TINY
from raysd.janitor import start_janitor, stop_janitor


def _state(ray, group) -> str:
    return ray.util.placement_group_table(group).get("state", "REMOVED")


def _until(condition, timeout: float = 30.0) -> bool:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            return False
        time.sleep(0.2)
    return True


def test_the_janitor_frees_the_groups_of_controllers_that_died_with_their_owner(ray_local):
    """Tune stops a trial by ending its driver's actor; Ray ends the controller that actor owns,
    but not the placement group the controller created, while the study's job lives."""
    ray = ray_local
    from ray.util.placement_group import placement_group, remove_placement_group

    @ray.remote(num_cpus=0)
    class Controller:  # Ray Train's controller, as raysd's guard callback registers its group
        def start(self, janitor):
            group = placement_group([{"CPU": 0.01}])
            ray.get(group.ready())
            context = ray.get_runtime_context()
            ray.get(janitor.guard.remote(context.get_actor_id(), context.current_actor, group))
            return context.get_actor_id(), group

    @ray.remote(num_cpus=0)
    class TrialDriver:  # Tune's trial actor: it owns the controller, which dies with it
        def start(self, janitor):
            self.controller = Controller.remote()
            return ray.get(self.controller.start.remote(janitor))

    janitor = start_janitor()
    try:
        drivers = [TrialDriver.remote() for _ in range(3)]
        (stopped, stopped_group), (live, live_group), (done, done_group) = ray.get(
            [d.start.remote(janitor) for d in drivers])
        assert ray.get(janitor.guarded.remote()).keys() == {stopped, live, done}
        ray.get(janitor.release.remote(done))  # a controller that ends of its own accord...
        ray.kill(drivers[0])  # ... and a trial Tune stopped
        ray.kill(drivers[2])
        assert _until(lambda: ray.get(janitor.removed.remote()) == [stopped_group.id.hex()])
        assert _state(ray, stopped_group) == "REMOVED"
        # The live controller's group stays; the released one's is its controller's to remove.
        assert _state(ray, live_group) == "CREATED" and _state(ray, done_group) == "CREATED"
        assert list(ray.get(janitor.guarded.remote())) == [live]
        assert ray.get(janitor.drain.remote(0.5)) == [live]  # the study's end waits for it...
        ray.kill(drivers[1])
        assert ray.get(janitor.drain.remote(30)) == []  # ... until it has died and been freed
        assert _state(ray, live_group) == "REMOVED"
        remove_placement_group(done_group)
    finally:
        stop_janitor(janitor, timeout_s=0)
    from ray.util.state import list_actors

    assert _until(lambda: not [a for a in list_actors(
        address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")])
        if a.class_name == "PlacementGroupJanitor"])  # ended by stop_janitor, not left running


def test_a_trials_group_is_freed_when_its_controller_is_killed_mid_study(ray_local, tmp_path):
    """A real trial whose Ray Train controller is SIGKILLed while it trains (an OOM kill, say):
    the trial fails, and its workers' placement group is removed while the study's job lives
    on (this test's process), which Ray alone would do only when the job ends."""
    ray = ray_local
    from raysd.overrides import parse_overrides
    from raysd.spaces import load_space
    from raysd.study import run_study
    from raysd.trial import trial_driver

    def driver(config, **kwargs):  # the real trial driver, and a thread that kills its controller
        import os
        import signal
        import threading
        from pathlib import Path

        from ray.util.state import list_actors

        run = Path(kwargs["train_storage"], config["trial_id"])

        def kill_controller_once_training():
            while not list(run.glob("checkpoint_*")):
                time.sleep(0.2)
            for actor in list_actors(filters=[("class_name", "=", "TrainController"),
                                              ("state", "=", "ALIVE")], detail=True):
                os.kill(actor.pid, signal.SIGKILL)

        threading.Thread(target=kill_controller_once_training, daemon=True).start()
        trial_driver(config, **kwargs)

    groups_before = set(ray.util.placement_group_table())
    space = load_space("demo", parse_overrides(TINY[1::2]))
    outcome = run_study(space, str(tmp_path / "killed"), num_samples=1, max_concurrent=1, driver=driver)
    assert outcome.counts["failed"] == 1
    groups = {k: v for k, v in ray.util.placement_group_table().items() if k not in groups_before}
    assert groups and all(g["state"] == "REMOVED" for g in groups.values()), groups
