"""A trial run as a chain (chain.py), without Ray: every point equals an independent run of its T'."""
import torch

from conftest import tiny_config
from raysd import models
from raysd.chain import Chain, points
from raysd.recipe import Hooks, run_trial


def _init():
    torch.manual_seed(0)
    return models.build("vit_tiny")


class Rows:
    def __init__(self, resume=None):
        self.rows, self.states = [], []
        self.hooks = Hooks(report=self.report, resume=resume)

    def report(self, metrics, state):
        self.rows.append(dict(metrics))
        if state is not None:
            self.states.append(state)


# No k-NN signal (it takes no part in a point's metrics) and small evaluations: cheap stages.
CHAIN = {"evaluation.signal": "none", "logging.checkpoint_every": 2, "evaluation.max_examples": 64}


def test_a_chain_reports_every_point_bit_identical_to_an_independent_run(digits, tmp_path):
    from raysd.artifacts import ArtifactStore

    chain = Rows()
    chain.hooks.artifacts = ArtifactStore(str(tmp_path), owner="chain")
    out = run_trial(tiny_config({**CHAIN, "self_distill.rounds": 1}), digits, _init(), chain.hooks,
                    chain=Chain((0, 1, 2)))
    got = points(out)
    assert sorted(got) == [0, 1, 2]
    # T' = 1 lies between two fine-tunes of the chain: its rounds, its fine-tune's randomness
    # and the fine-tunes around it must all leave it as a trial of T' = 1 alone computes it.
    alone = run_trial(tiny_config({**CHAIN, "self_distill.rounds": 1}), digits, _init(), Hooks())
    for key, value in got[1].items():
        assert alone[key] == value, key
    assert {"val_accuracy", "test_accuracy", "gen_gap", "init_distance"} <= set(got[1])
    # The chain's stages are artifacts as a trial's are: a trial of T' = 2 loads them all.
    shared = run_trial(tiny_config({**CHAIN, "self_distill.rounds": 2}), digits, _init(),
                       Hooks(artifacts=ArtifactStore(str(tmp_path), owner="param")))
    assert shared["reused_further_pretrain"] and shared["reused_self_distill_1"] and shared["reused_self_distill_2"]
    assert all(shared[key] == value for key, value in got[2].items())
    # Each point is reported at its boundary, with its T' and the chain's clock.
    reported = [r for r in chain.rows if "points_done" in r]
    assert [(r["rounds"], r["points_done"]) for r in reported] == [(0, 1), (1, 2), (2, 3)]
    assert all(r["val_accuracy"] == got[r["rounds"]]["val_accuracy"] for r in reported)
    # The trial's metric is its best point on validation (ties: the smaller T').
    values = [got[t]["val_accuracy"] for t in (0, 1, 2)]
    assert out["best_rounds"] == values.index(max(values))
    assert out["val_loss"] == got[out["best_rounds"]]["val_loss"]
    assert chain.rows[-1]["trial_done"] and chain.rows[-1]["val_accuracy"] == max(values)
    # The fine-tunes' history rows name the point they belong to.
    tuned = {r["round"] for r in chain.rows if r.get("stage") == "finetune"}
    assert tuned == {0, 1, 2}

    # Killed inside round 2: the chain resumes inside that round, keeps points 0 and 1, and
    # ends with the same points.
    mid = [s for s in chain.states if s["stage_index"] == 4 and s.get("mid_stage")]
    assert mid and mid[0]["mid_stage"]["step"] == 2
    resumed = Rows(resume=mid[0])
    again = run_trial(tiny_config({**CHAIN, "self_distill.rounds": 1}), digits, _init(), resumed.hooks,
                      chain=Chain((0, 1, 2)))
    assert points(again) == got
    assert {r["stage"] for r in resumed.rows if "stage" in r} == {"self_distill", "finetune"}
