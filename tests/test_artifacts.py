"""Stage artifacts, leases, reuse across trials, the teacher cache and the early signal; no Ray."""
import copy
import dataclasses
import json
import time

import pytest
import torch

from conftest import tiny_config
from raysd import models
from raysd.artifacts import ArtifactStore, state_hash
from raysd.losses import distill_loss
from raysd.recipe import Hooks, init_key, run_trial, stage_key, stage_name
from raysd.teacher import CachedTargets, LiveTargets, teacher_targets


def _init(seed=0):
    torch.manual_seed(seed)
    return models.build("vit_tiny")


def _trial(cfg, task, store=None):
    rows = []
    out = run_trial(cfg, task, _init(), Hooks(report=lambda m, s: rows.append(dict(m)), artifacts=store))
    return out, rows


def test_a_trial_reuses_the_stages_another_trained_with_identical_results(digits, tmp_path):
    store = ArtifactStore(str(tmp_path / "artifacts"), owner="a")
    short, _ = _trial(tiny_config({"self_distill.rounds": 1}), digits, store)
    assert not short["reused_further_pretrain"] and not short["reused_self_distill_1"]
    # T'=2 with the same gamma, lambda, seed: theta_0 and theta_1 are loaded, only round 2 trains.
    long_cfg = tiny_config({"self_distill.rounds": 2})
    reused, rows = _trial(long_cfg, digits, ArtifactStore(store.uri, owner="b"))
    assert reused["reused_further_pretrain"] and reused["reused_self_distill_1"]
    assert not reused["reused_self_distill_2"]
    assert reused["key_self_distill_1"] == short["key_self_distill_1"]
    assert {r["stage"] for r in rows if "loss" in r and r.get("step", 0) < 4} == {"self_distill", "finetune"}
    # Reuse changes nothing at a fixed seed: the same trial trained from scratch ends identical.
    alone, _ = _trial(long_cfg, digits)
    for key in ("val_loss", "val_accuracy", "test_loss", "init_distance",
                "knn_accuracy_further_pretrain", "knn_accuracy_self_distill_2"):
        assert reused[key] == alone[key], key


def _keys(cfg, task, init=None):
    """The artifact keys of a trial's pre-training stages, as run_trial forms them."""
    key, keys = init_key(init or _init(), task), {}
    for stage, round_ in cfg.stages()[:-1]:
        key, _ = stage_key(key, cfg, stage, round_, Hooks(), task)
        keys[stage_name(stage, round_)] = key
    return keys


@pytest.mark.parametrize("change,shares_theta_0", [
    ({"mask_ratio": 0.5}, False), ({"seed": 1}, False), ({"weights": "other"}, False),
    ({"further_pretrain.steps": 5}, False), ({"further_pretrain.lr": 2e-3}, False),
    ({"evaluation.val_fraction": 0.2}, False),  # D_u of a source without a val split
    ({"self_distill.mae_weight": 0.5}, True), ({"self_distill.teacher_cache": "on"}, True),
    # the teacher cache's batches: bf16 kernels may round by shape
    ({"self_distill.teacher_cache": "on", "evaluation.batch_size": 7}, True),
    ({"self_distill.lr": 2e-3}, True), ({"self_distill.steps": 5}, True),
])
def test_keys_change_with_every_input_that_changes_the_weights(digits, change, shares_theta_0):
    base, other = _keys(tiny_config(), digits), _keys(tiny_config(change), digits)
    if "evaluation.batch_size" in change:
        base = _keys(tiny_config({"self_distill.teacher_cache": "on"}), digits)
    assert other["self_distill_1"] != base["self_distill_1"]
    assert (other["further_pretrain"] == base["further_pretrain"]) == shares_theta_0


def test_settings_that_cannot_change_the_weights_leave_every_key_alone(digits):
    base = _keys(tiny_config(), digits)
    same = {"logging.log_every": 1, "logging.checkpoint_every": 1, "resources.loader_workers": 1,
            "evaluation.signal": "none", "evaluation.every": 2, "self_distill.rounds": 1,
            "finetune.lr": 0.5, "finetune.dropout": 0.0}
    assert _keys(tiny_config(same), digits) == base
    # Uncached targets are not computed in evaluation batches; `auto` that resolves to live
    # targets keys like `off`; a number keys alike however it is written.
    assert _keys(tiny_config({"evaluation.batch_size": 7}), digits) == base
    assert _keys(tiny_config({"self_distill.teacher_cache": "off"}), digits) == base
    assert _keys(tiny_config({"self_distill.mae_weight": 1}), digits) == base


def test_theta_init_content_and_the_data_are_part_of_the_key(digits):
    assert _keys(tiny_config(), digits, _init(0)) != _keys(tiny_config(), digits, _init(1))
    assert _keys(tiny_config(), digits) != _keys(tiny_config(), dataclasses.replace(digits, source="builtin:x"))
    assert state_hash(_init(0).state_dict()) == state_hash(_init(0).state_dict())


def test_a_directory_sources_fingerprint_follows_its_files(tmp_path):
    """A jsonl task's fingerprint (part of every artifact key) follows its files, without
    reading them: an edited or an added file changes it."""
    from raysd.data import load_task
    from raysd.data.text import builtin_tokenizer

    for name in ("train", "dev", "test"):
        lines = [{"text": f"{word} number {i}", "label": word} for i in range(4) for word in "ab"]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))

    def fingerprint():
        return load_task(f"jsonl:{tmp_path}", tokenizer=builtin_tokenizer(), max_length=16).fingerprint

    first = fingerprint()
    assert fingerprint() == first != ""
    with (tmp_path / "train.jsonl").open("a") as f:
        f.write(json.dumps({"text": "a new line", "label": "a"}) + "\n")
    second = fingerprint()
    (tmp_path / "notes.txt").write_text("x")
    assert len({first, second, fingerprint()}) == 3


def test_the_code_version_ignores_comments_and_docstrings_but_not_statements():
    from raysd.artifacts import _statements, code_version, library_versions

    source = 'def f(x):\n    """Doc."""\n    return x + 1  # why\n'
    assert _statements(source) == _statements('def f(x):\n    """Other doc."""\n    return x + 1\n')
    assert _statements(source) != _statements('def f(x):\n    """Doc."""\n    return x + 2\n')
    assert len(code_version()) == 16 and set(library_versions()) == {"torch", "timm", "transformers",
                                                                       "tokenizers"}


def test_a_builtin_sets_fingerprint_follows_its_contents(monkeypatch, digits):
    """builtin:text's docstrings and scikit-learn's digits change between releases: the root
    key holds a hash of what was loaded, not "" for every builtin set."""
    from raysd.data import load_task, text
    from raysd.data.text import builtin_tokenizer

    tokenizer = builtin_tokenizer()
    first = load_task("builtin:text", tokenizer=tokenizer, max_length=16).fingerprint
    assert first != "" and digits.fingerprint != "" and digits.fingerprint != first
    splits = text.builtin_splits()
    splits["train"][0][0] += " (a newer Python's docstring)"
    monkeypatch.setattr(text, "builtin_splits", lambda: splits)
    assert load_task("builtin:text", tokenizer=tokenizer, max_length=16).fingerprint != first


def test_lease_one_builder_others_wait_and_a_dead_builders_lease_expires(tmp_path):
    a = ArtifactStore(str(tmp_path), owner="trial-a", lease_seconds=60)
    b = ArtifactStore(str(tmp_path), owner="trial-b", lease_seconds=60)
    assert a.claim("k") == "build"
    assert b.claim("k") == "wait" and b.lease_holder("k") == "trial-a"
    assert ArtifactStore(str(tmp_path), owner="trial-a").claim("k") == "build"  # a restarted trial keeps its lease
    # A builder that died: its lease is not renewed and runs out; the waiter takes over.
    (tmp_path / "k.lease.0").write_text(json.dumps({"owner": "trial-a", "expires": time.time() - 1}))
    assert b.claim("k") == "build" and a.claim("k") == "wait"
    b.save("k", {"w": torch.ones(2)}, {"row": {"loss": 1.0}})
    b.release("k")
    assert a.claim("k") == "ready" and not list(tmp_path.glob("k.lease*"))
    weights, meta = a.load("k")
    assert torch.equal(weights["w"], torch.ones(2)) and meta["row"]["loss"] == 1.0


def test_a_lease_is_renewed_while_building(tmp_path):
    a = ArtifactStore(str(tmp_path), owner="a", lease_seconds=0.4)
    b = ArtifactStore(str(tmp_path), owner="b", lease_seconds=0.4)
    assert a.claim("k") == "build"
    with a.building("k"):
        time.sleep(1.0)  # more than two lease lengths: only renewal keeps b out
        assert b.claim("k") == "wait"
    assert b.claim("k") == "build"  # released when the build ended


def test_teacher_cache_gives_the_live_teachers_distillation_loss(digits):
    cfg = tiny_config({"self_distill.teacher_cache": "on", "evaluation.batch_size": 37})  # other batches than training's
    teacher, student = _init(1).eval(), _init(0)
    cached = teacher_targets(teacher, digits.unlabelled, cfg, Hooks(), samples=0)
    live = teacher_targets(teacher, digits.unlabelled, tiny_config({"self_distill.teacher_cache": "off"}), Hooks(), samples=0)
    assert isinstance(cached, CachedTargets) and isinstance(live, LiveTargets)
    for start in (0, 100, 700):
        items = [cached.dataset[i] for i in range(start, start + 16)]
        batch = {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in items[0]}
        repr_ = student.represent(batch)
        assert torch.allclose(distill_loss(repr_, cached(batch)), distill_loss(repr_, live(batch)),
                              rtol=1e-5, atol=1e-6)
    # auto: cached only when the round draws at least len(D_u) samples
    auto = tiny_config({"self_distill.teacher_cache": "auto"})
    assert isinstance(teacher_targets(teacher, digits.unlabelled, auto, Hooks(), samples=10), LiveTargets)
    assert isinstance(teacher_targets(teacher, digits.unlabelled, auto, Hooks(),
                                      samples=len(digits.unlabelled)), CachedTargets)


def test_a_round_with_the_teacher_cache_trains_like_one_without(digits):
    on, _ = _trial(tiny_config({"self_distill.teacher_cache": "on"}), digits)
    off, _ = _trial(tiny_config({"self_distill.teacher_cache": "off"}), digits)
    assert on["key_self_distill_1"] != off["key_self_distill_1"]
    assert on["val_loss"] == pytest.approx(off["val_loss"], rel=1e-4)


def test_early_signal_after_each_pretraining_stage_with_asha_clock(digits):
    out, rows = _trial(tiny_config({"self_distill.rounds": 2}), digits)
    signal_rows = [r for r in rows if "knn_accuracy" in r]
    assert [(r["stage"], r["round"], r["stages_done"]) for r in signal_rows] == [
        ("further_pretrain", 0, 1), ("self_distill", 1, 2), ("self_distill", 2, 3)]
    assert all(0.0 <= r["knn_accuracy"] <= 1.0 for r in signal_rows)
    assert out["knn_accuracy_self_distill_2"] == signal_rows[-1]["knn_accuracy"]
    # No fine-tuning row carries the signal: ASHA never compares it with a fine-tuning metric.
    assert not any("knn_accuracy" in r for r in rows if r["stage"] == "finetune" and not r.get("trial_done"))


def test_knn_signal_separates_a_representation_that_knows_the_labels(digits):
    from raysd.stages import StageRun, knn_signal

    class Oracle(torch.nn.Module):
        """f(x) = one-hot of the label (+ noise): k-NN must find every class."""
        hidden_size = 10

        def represent(self, batch):
            return torch.nn.functional.one_hot(batch["y"], 10).float() + 0.01 * torch.randn(len(batch["y"]), 10)

    class Noise(Oracle):
        def represent(self, batch):
            return torch.randn(len(batch["y"]), 10)

    run = StageRun(tiny_config(), Hooks(), "further_pretrain", 0)
    assert knn_signal(Oracle(), digits, run)["knn_accuracy"] == 1.0
    assert knn_signal(Noise(), digits, run)["knn_accuracy"] < 0.3


def test_a_waiting_trial_loads_what_the_lease_holder_built(digits, tmp_path, monkeypatch):
    import raysd.recipe as recipe

    cfg = tiny_config(method="further_pretrain")
    first, _ = _trial(cfg, digits)
    key = first["key_further_pretrain"]
    holder = ArtifactStore(str(tmp_path), owner="holder")
    assert holder.claim(key) == "build"
    waiter = ArtifactStore(str(tmp_path), owner="waiter")

    def finish_meanwhile(seconds):  # while the waiter sleeps, the holder finishes
        weights = copy.deepcopy(_init().state_dict())
        holder.save(key, weights, {"row": {"loss": 0.5, "knn_accuracy": 0.25}, "signal": recipe.signal_id(cfg)})
        holder.release(key)

    monkeypatch.setattr(recipe.time, "sleep", finish_meanwhile)
    out, rows = _trial(cfg, digits, waiter)
    assert out["reused_further_pretrain"]
    assert [r["knn_accuracy"] for r in rows if "knn_accuracy" in r] == [0.25]


def test_knn_signal_votes_with_the_20_nearest_neighbours(digits):
    """DINO's weighted k-NN with k = 20, recomputed here on a fixed random projection of the pixels."""
    from raysd.stages import StageRun, knn_signal

    class Projection(torch.nn.Module):
        hidden_size = 16
        weight = torch.randn(3 * 32 * 32, 16, generator=torch.Generator().manual_seed(0))

        def represent(self, batch):
            return batch["x"].flatten(1) @ self.weight

    def by_hand(k):
        bank = torch.stack([digits.unlabelled[i]["x"] for i in range(len(digits.unlabelled))])
        query = torch.stack([digits.val[i]["x"] for i in range(len(digits.val))])
        bank_y = torch.tensor([digits.unlabelled[i]["y"] for i in range(len(digits.unlabelled))])
        query_y = torch.tensor([digits.val[i]["y"] for i in range(len(digits.val))])
        sims = (torch.nn.functional.normalize(Projection().represent({"x": query}), dim=1)
                @ torch.nn.functional.normalize(Projection().represent({"x": bank}), dim=1).T)
        top, index = sims.topk(k, dim=1)
        votes = torch.zeros(len(query), 10).scatter_add_(1, bank_y[index], (top / 0.07).exp())
        return float((votes.argmax(1) == query_y).float().mean())

    assert by_hand(20) != by_hand(1)  # else the test could not tell k = 1 from k = 20
    run = StageRun(tiny_config({"evaluation.signal_examples": 0}), Hooks(), "further_pretrain", 0)
    assert knn_signal(Projection(), digits, run)["knn_accuracy"] == pytest.approx(by_hand(20))
