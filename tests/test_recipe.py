"""The method itself, without Ray: stages, restarts, the decoder rule, resume, evaluation."""
import copy
import math

import pytest
import torch

from conftest import tiny_config
from raysd import models
from raysd.losses import distill_loss
from raysd.history import history_row, history_schema
from raysd.recipe import Hooks, NonFiniteLoss, run_trial
from raysd.spaces import load_space
from raysd.stages import metrics_from_confusion
from raysd.writers import history_metrics


def _init(seed=0):
    torch.manual_seed(seed)
    return models.build("vit_tiny")


class Recorder:
    """Hooks that remember what the recipe showed them."""

    def __init__(self, resume=None):
        self.wrapped, self.rows, self.states = [], [], []
        self.hooks = Hooks(wrap=self.wrap, report=self.report, resume=resume)

    def wrap(self, model):
        self.wrapped.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return model

    def report(self, metrics, state):
        self.rows.append(dict(metrics))
        if state is not None:
            self.states.append(copy.deepcopy(state))


@pytest.mark.parametrize("method,stages", [
    ("finetune", ["finetune"]),
    ("further_pretrain", ["further_pretrain", "finetune"]),
    ("self_distill", ["further_pretrain", "self_distill", "finetune"]),
])
def test_each_method_runs_its_stages_and_reports_real_metrics(digits, method, stages):
    rec = Recorder()
    out = run_trial(tiny_config(method=method), digits, _init(), rec.hooks)
    assert [r["stage"] for r in rec.rows if not r.get("trial_done")][::2] == stages
    for split in ("val", "test", "train"):
        assert 0.0 <= out[f"{split}_accuracy"] <= 1.0
        assert math.isfinite(out[f"{split}_loss"])
    assert rec.rows[-1]["trial_done"] and rec.rows[-1]["val_accuracy"] == out["val_accuracy"]
    assert out["init_distance"] > 0
    assert all(f"seconds_{s}" in out or f"seconds_{s}_1" in out for s in stages)
    # Every key a trial reports has its column in the history's one schema (history.py).
    reported = {k for r in rec.rows for k in history_row("t", r)}
    assert not reported - set(history_schema(history_metrics(load_space("demo"))).names)


def test_every_round_restarts_from_theta_init(digits):
    init = _init()
    theta_init = {k: v.clone() for k, v in init.state_dict().items()}
    rec = Recorder()
    run_trial(tiny_config({"self_distill.rounds": 3}), digits, init, rec.hooks)
    # further pre-training, then three rounds: each student is wrapped at theta_init, phi_init
    assert len(rec.wrapped) == 5
    for state in rec.wrapped[:4]:
        assert all(torch.equal(state[k], theta_init[k]) for k in theta_init)
    # ... and the teachers of consecutive rounds differ (each round trains a new student)
    carries = [s["theta"] for s in rec.states if "mid_stage" not in s]  # stage boundaries
    assert len(carries) == 4
    assert not torch.equal(carries[1]["encoder.blocks.0.mlp.fc1.weight"],
                           carries[2]["encoder.blocks.0.mlp.fc1.weight"])


def test_fine_tuning_starts_from_the_methods_weights(digits):
    rec = Recorder()
    run_trial(tiny_config(method="further_pretrain"), digits, _init(), rec.hooks)
    theta_0 = rec.states[-1]["theta"]
    start = rec.wrapped[-1]
    assert all(torch.equal(start[f"backbone.{k}"], v) for k, v in theta_0.items() if k.startswith("encoder."))
    assert not any(k.startswith("backbone.decoder") for k in start)  # decoder dropped


def test_zero_mae_weight_leaves_the_decoder_untouched(digits):
    init = _init()
    decoder_init = {k: v.clone() for k, v in init.state_dict().items() if k.startswith("decoder.")}
    rec = Recorder()
    run_trial(tiny_config({"self_distill.mae_weight": 0.0, "self_distill.rounds": 1}), digits, init, rec.hooks)
    after_round = [s["theta"] for s in rec.states if "mid_stage" not in s][1]
    assert all(torch.equal(after_round[k], v) for k, v in decoder_init.items())
    encoder_moved = any(not torch.equal(after_round[k], init.state_dict()[k])
                        for k in after_round if k.startswith("encoder.blocks"))
    assert encoder_moved
    assert "mae_loss" not in [r for r in rec.rows if r["stage"] == "self_distill"][0]


def test_distillation_gradient_never_reaches_the_decoder(digits):
    student, teacher = _init(0), _init(1).eval()
    batch = {"x": torch.stack([digits.unlabelled[i]["x"] for i in range(8)])}
    with torch.no_grad():
        target = teacher.represent(batch)
    # One forward as in a self-distillation step: the decoder runs (MAE) beside the representation.
    out = student(batch, mask_ratio=0.75, represent=True)
    distill_loss(out["repr"], target).backward(retain_graph=True)
    assert all(p.grad is None for p in student.decoder.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.encoder.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    out["mae"].backward()  # the MAE term is what moves the decoder
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.decoder.parameters()
               if p.requires_grad and p.dim() > 1)


def test_resume_mid_stage_gives_the_same_weights_as_an_uninterrupted_run(digits):
    cfg = tiny_config({"self_distill.rounds": 1, "logging.checkpoint_every": 2, "logging.log_every": 1})
    full = Recorder()
    out_full = run_trial(cfg, digits, _init(), full.hooks)
    mid = [s for s in full.states if s.get("mid_stage", {}).get("step") == 2
           and s["stage_index"] == 1]  # inside round 1
    assert len(mid) == 1
    resumed = Recorder(resume=mid[0])
    out_resumed = run_trial(cfg, digits, _init(), resumed.hooks)
    final_carry = lambda rec: [s for s in rec.states if "mid_stage" not in s][-1]["theta"]  # noqa: E731
    a, b = final_carry(full), final_carry(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    for key in ("val_loss", "test_loss", "init_distance"):
        assert out_full[key] == out_resumed[key]
    # the resumed run did not repeat further pre-training
    assert "further_pretrain" not in {r["stage"] for r in resumed.rows}


def test_divergence_is_caught_with_stage_and_step(digits):
    cfg = tiny_config({"further_pretrain.steps": 50, "further_pretrain.lr": 1e30}, method="further_pretrain")
    with pytest.raises(NonFiniteLoss, match=r"further_pretrain round 0 step \d+: loss is (nan|inf)"):
        run_trial(cfg, digits, _init(), Hooks())


def test_metrics_from_confusion_match_sklearn():
    from sklearn.metrics import f1_score

    y_true = [0, 0, 1, 1, 2, 2, 2, 3]
    y_pred = [0, 1, 1, 1, 2, 0, 2, 2]
    confusion = torch.zeros(4, 4, dtype=torch.float64)
    for t, p in zip(y_true, y_pred):
        confusion[t, p] += 1
    out = metrics_from_confusion(confusion, 4.0, ("macro_f1", "micro_f1"))
    assert out["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    assert out["micro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="micro"))
    assert out["loss"] == 0.5


def test_weight_decay_exemptions_follow_the_reference():
    """Fine-tuning exempts names holding bias, position embeddings or the CLS token (norm
    weights decay); pre-training stages exempt 1-D tensors and biases (timm's add_weight_decay)."""
    from raysd.models import Classifier
    from raysd.stages import _param_groups

    model = Classifier(_init(), 10)
    model.requires_grad_(True)  # position embeddings train while fine-tuning
    names = {id(p): n for n, p in model.named_parameters()}

    def groups(stage):
        return (set(names[id(p)] for p in g["params"]) for g in _param_groups(model, 0.05, stage))

    decay, free = groups("finetune")
    assert {"backbone.encoder.cls_token", "backbone.encoder.pos_embed", "head.bias",
            "backbone.encoder.blocks.0.attn.qkv.bias"} <= free
    assert {"backbone.encoder.blocks.0.attn.qkv.weight", "head.weight",
            "backbone.encoder.blocks.0.norm1.weight", "backbone.encoder.norm.weight"} <= decay
    assert not any("bias" in n for n in decay)
    decay, free = groups("further_pretrain")
    assert {"backbone.encoder.blocks.0.norm1.weight", "head.bias"} <= free
    assert {"backbone.encoder.cls_token", "backbone.encoder.pos_embed", "head.weight"} <= decay
    assert all(model.get_parameter(n).ndim <= 1 for n in free)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_finetuning_trains_position_embeddings_with_hidden_dropout_where_the_reference_has_it(digits, dropout):
    """Dropout at the embeddings (pos_drop), the attention output (proj_drop) and the MLP output
    (drop2), as the reference's hidden_dropout_prob; none after the GELU (drop1) or on the
    attention probabilities. Position embeddings, fixed in pre-training, train."""
    seen, models_seen = [], []

    def wrap(model):
        seen.append({name: m.p for name, m in model.named_modules() if isinstance(m, torch.nn.Dropout)})
        models_seen.append(model)
        return model

    init = _init()
    run_trial(tiny_config({"finetune.dropout": dropout}, method="finetune"), digits, init, Hooks(wrap=wrap))
    hidden = {n: p for n, p in seen[-1].items() if n.endswith(("pos_drop", "proj_drop", "drop2"))}
    assert len(hidden) == 1 + 2 * len(init.encoder.blocks) and set(hidden.values()) == {dropout}
    assert {p for n, p in seen[-1].items() if n not in hidden} == {0.0}
    tuned = models_seen[-1].backbone.encoder.pos_embed
    assert tuned.requires_grad and not torch.equal(tuned.detach(), init.encoder.pos_embed)


def test_the_head_is_initialised_as_the_reference():
    """ViTForImageClassification's Linear init: truncated normal of std 0.02, zero bias."""
    from raysd.models import Classifier

    classifier = Classifier(_init(), 500)
    classifier.init_head()
    assert classifier.head.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert not classifier.head.bias.any()


def test_the_embedding_dropout_is_applied():
    backbone = _init()
    for module in backbone.encoder.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    backbone.encoder.pos_drop.p = 0.5
    batch = {"x": torch.randn(2, 3, 32, 32)}
    assert not torch.equal(backbone.train().represent(batch), backbone.represent(batch))
    assert torch.equal(backbone.eval().represent(batch), backbone.represent(batch))


def test_flip_augments_only_the_finetuning_view():
    from raysd.data import load_task

    flip = load_task("builtin:digits", image_size=32, augment="flip")
    torch.manual_seed(0)
    flipped = [torch.equal(flip.train[i]["x"], flip.unlabelled[i]["x"].flip(-1)) for i in range(40)]
    assert 5 < sum(flipped) < 35  # about half, drawn per example
    plain = load_task("builtin:digits", image_size=32, augment="none")
    assert all(torch.equal(plain.train[i]["x"], plain.unlabelled[i]["x"]) for i in range(40))


def _theta_0(init, digits):
    """theta_0 of a tiny further pre-training, the teacher of round 1."""
    from raysd.stages import StageRun, further_pretrain

    theta, _ = further_pretrain(init, digits.unlabelled, StageRun(tiny_config(), Hooks(), "further_pretrain", 0))
    return theta


def test_lambda_weights_the_mae_term_not_the_distillation_term(digits):
    from raysd.stages import StageRun, self_distill_round

    init = _init()
    run = StageRun(tiny_config({"self_distill.mae_weight": 0.25}), Hooks(), "self_distill", 1)
    _, last = self_distill_round(init, _theta_0(init, digits), digits.unlabelled, run)
    assert last["mae_loss"] != pytest.approx(last["distill_loss"], rel=0.1)  # else the test is blind
    assert last["loss"] == pytest.approx(0.25 * last["mae_loss"] + last["distill_loss"], rel=1e-5)


@pytest.mark.parametrize("cache", ["on", "off"])
def test_the_teacher_runs_in_eval_mode_so_its_dropout_is_off(digits, monkeypatch, cache):
    """With dropout in the model, a teacher left in train mode gives other targets than f(x)."""
    import raysd.objectives as objectives
    import raysd.stages as stages

    init = _init()
    dropouts = [m for m in init.encoder.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts
    for module in dropouts:
        module.p = 0.5
    theta_0 = _theta_0(init, digits)
    targets, real = [], objectives.teacher_targets
    monkeypatch.setattr(objectives, "teacher_targets", lambda *a, **k: targets.append(real(*a, **k)) or targets[-1])
    run = stages.StageRun(tiny_config({"self_distill.teacher_cache": cache}), Hooks(), "self_distill", 1)
    stages.self_distill_round(init, theta_0, digits.unlabelled, run)
    teacher = copy.deepcopy(init)
    teacher.load_state_dict(theta_0)
    items = [targets[0].dataset[i] for i in range(16)]
    batch = {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in items[0]}
    with torch.no_grad():
        assert torch.allclose(targets[0](batch), teacher.eval().represent(batch), atol=1e-5)


def test_each_split_is_evaluated_on_its_own_data(digits):
    from raysd.stages import StageRun, evaluate, finetune_and_evaluate

    init = _init()
    cfg = tiny_config(method="finetune")
    _, metrics, model = finetune_and_evaluate(init, init.state_dict(), digits,
                                              StageRun(cfg, Hooks(), "finetune", 0))
    for split, dataset in (("val", digits.val), ("test", digits.test), ("train", digits.unlabelled)):
        assert metrics[f"{split}_loss"] == evaluate(model, dataset, digits, cfg, Hooks())["loss"], split
    assert metrics["val_loss"] != metrics["test_loss"]


def test_the_classification_head_does_not_depend_on_the_global_random_state(digits):
    """A retried trial, or another DDP rank, draws the same head: it is seeded from cfg.seed."""
    from raysd.stages import StageRun, finetune_and_evaluate

    init = _init()
    heads = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        seen = []

        def wrap(model):
            seen.append(model.head.weight.detach().clone())
            return model

        cfg = tiny_config(method="finetune")
        finetune_and_evaluate(init, init.state_dict(), digits, StageRun(cfg, Hooks(wrap=wrap), "finetune", 0))
        heads.append(seen[0])
    assert torch.equal(heads[0], heads[1])


def test_zero_mae_weight_round_runs_under_ddp(digits):
    """lambda = 0: the decoder takes no part, so it must not require grad - DDP (here one gloo
    rank) refuses a parameter that requires grad and never gets one."""
    import socket

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from raysd.stages import StageRun, self_distill_round

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        init = _init()
        run = StageRun(tiny_config({"self_distill.mae_weight": 0.0}), Hooks(wrap=DistributedDataParallel), "self_distill", 1)
        self_distill_round(init, init.state_dict(), digits.unlabelled, run)
    finally:
        dist.destroy_process_group()
