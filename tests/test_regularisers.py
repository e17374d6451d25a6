"""The paper's baselines and ablations (raysd/regularisers.py, objectives.py), each against an
independent computation on a tiny model, and the ablations' stage keys. No Ray, no training."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from raysd import models
from raysd.config import METHODS, PLANS
from raysd.losses import masked_mse, token_kl
from raysd.recipe import stage_key
from raysd.regularisers import (RecAdam, anneal, embedding_noise, l2_distance, mars_distance,
                                mars_norm, mars_project, symmetric_kl)
from raysd.stages import Hooks, StageRun


def _vit(seed=0):
    torch.manual_seed(seed)
    return models.build("vit_tiny")


def _images(n=4, seed=0):
    return {"x": torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)),
            "y": torch.arange(n) % 10}


# --- RecAdam ---------------------------------------------------------------------------

def test_recadam_update_matches_its_formula_step_by_step():
    """Three steps on a Linear against RecAdam's update written out by hand, with the pull,
    the annealing, bias correction and decoupled decay all visible (k, t0 chosen so that
    lambda(t) moves from ~0.12 to ~0.5 over the steps)."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    start = {n: p.detach() + 0.3 for n, p in layer.named_parameters()}  # away from the weights
    lr, b1, b2, eps, wd, k, t0, coef = 0.1, 0.9, 0.99, 1e-8, 0.01, 1.0, 3, 2.0
    opt = RecAdam([{"params": [layer.weight], "weight_decay": wd},
                   {"params": [layer.bias], "weight_decay": 0.0}], lr=lr, betas=(b1, b2), k=k, t0=t0,
                  coef=coef, starts={layer.weight: start["weight"], layer.bias: start["bias"]}, eps=eps)
    ref = {n: p.detach().clone() for n, p in layer.named_parameters()}
    m = {n: torch.zeros_like(p) for n, p in ref.items()}
    v = {n: torch.zeros_like(p) for n, p in ref.items()}
    x = torch.randn(5, 3)
    for t in range(1, 4):
        opt.zero_grad()
        layer(x * t).pow(2).sum().backward()
        grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
        opt.step()
        lam = 1 / (1 + math.exp(-k * (t - t0)))
        for n in ref:
            m[n] = b1 * m[n] + (1 - b1) * grads[n]
            v[n] = b2 * v[n] + (1 - b2) * grads[n] ** 2
            size = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
            new = ref[n] - size * lam * m[n] / (v[n].sqrt() + eps)
            new = new - lr * (1 - lam) * coef * (new - start[n])
            ref[n] = new - lr * (wd if n == "weight" else 0.0) * new
        for n, p in layer.named_parameters():
            torch.testing.assert_close(p.detach(), ref[n], rtol=1e-6, atol=1e-7)


def test_recadam_anneals_from_the_pull_to_the_task():
    assert anneal(1, 0.5, 1000) < 1e-100 and anneal(1000, 0.5, 1000) == 0.5
    assert anneal(2000, 0.5, 1000) == pytest.approx(1.0)


def test_recadam_leaves_parameters_without_a_start_to_plain_adam():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    rec = RecAdam(a.parameters(), lr=0.1, betas=(0.9, 0.999), k=0.5, t0=1000, coef=5000.0, starts={})
    adam = torch.optim.Adam(b.parameters(), lr=0.1)
    for opt, layer in ((rec, a), (adam, b)):
        layer(torch.ones(1, 3)).sum().backward()
        opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q)


# --- MARS ------------------------------------------------------------------------------

def test_mars_projection_lands_on_the_ball_row_by_row():
    torch.manual_seed(0)
    start = torch.randn(6, 5)
    diff = torch.randn(6, 5)
    diff[:3] *= 0.01  # rows 0-2 inside the ball, 3-5 outside
    radius = 1.0
    weight = start + diff
    mars_project(weight, start, radius)
    row_norms = (weight - start).abs().sum(1)
    torch.testing.assert_close(weight[:3], (start + diff)[:3])  # inside: untouched
    torch.testing.assert_close(row_norms[3:], torch.full((3,), radius))  # outside: on the sphere
    direction = F.normalize(diff[3:], p=1, dim=1)
    torch.testing.assert_close(F.normalize(weight[3:] - start[3:], p=1, dim=1), direction)
    assert mars_norm(weight - start) == pytest.approx(radius)


def test_mars_reads_a_convolution_as_one_row_per_output_channel():
    conv = torch.zeros(2, 3, 2, 2)
    conv[0] = 1.0  # row 0 sums to 12
    mars_project(conv, None, 6.0)  # around 0
    assert conv[0].abs().sum() == pytest.approx(6.0) and conv[1].abs().sum() == 0


# --- R3F -------------------------------------------------------------------------------

def test_symmetric_kl_is_both_directions_of_kl_batch_mean():
    torch.manual_seed(0)
    p, q = torch.randn(4, 7), torch.randn(4, 7)
    expected = (F.kl_div(F.log_softmax(q, -1), F.softmax(p, -1), reduction="batchmean")
                + F.kl_div(F.log_softmax(p, -1), F.softmax(q, -1), reduction="batchmean"))
    torch.testing.assert_close(symmetric_kl(p, q), expected)
    assert symmetric_kl(p, p) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("kind", ["normal", "uniform"])
def test_r3f_noise_doubles_the_batch_with_a_detached_noised_copy(kind):
    emb = torch.randn(3, 5, 8, requires_grad=True)
    out = embedding_noise(kind, 1e-2)(emb)
    assert out.shape == (6, 5, 8)
    torch.testing.assert_close(out[:3], emb)
    noise = (out[3:] - emb).detach()
    assert 0 < noise.abs().max() < (1e-2 if kind == "uniform" else 1e-1)
    out[3:].sum().backward()
    assert not emb.grad.any()  # fairseq noises a detached copy


def test_r3f_step_loss_is_ce_plus_lambda_times_symmetric_kl_of_one_noise_draw(digits):
    from raysd.objectives import finetune_step

    cfg = tiny_config({"r3f.lam": 0.7, "r3f.eps": 0.5}, method="r3f").effective()
    classifier = models.Classifier(_vit(), 10).eval()
    step_loss, _, _ = finetune_step(classifier, classifier.backbone.state_dict(), StageRun(cfg, Hooks(), "finetune", 0))
    batch = _images()
    torch.manual_seed(3)
    loss, parts = step_loss(batch)
    torch.manual_seed(3)
    noise = torch.randn(4, 64, 64) * 0.5  # the draw the step made, [B, K, D]
    clean = classifier(batch)
    noised = classifier(batch, perturb=lambda e: e + noise)
    kl = (F.kl_div(F.log_softmax(noised, -1), F.softmax(clean, -1), reduction="batchmean")
          + F.kl_div(F.log_softmax(clean, -1), F.softmax(noised, -1), reduction="batchmean"))
    assert kl > 1e-4  # the noise is large enough to be seen
    torch.testing.assert_close(loss, F.cross_entropy(clean, batch["y"]) + 0.7 * kl, rtol=1e-4, atol=1e-6)


# --- weight matching -------------------------------------------------------------------

def test_weight_distances_match_a_direct_computation():
    student, teacher = _vit(0), _vit(1)
    anchor = teacher.encoder.state_dict()
    trained = [(n, p) for n, p in student.encoder.named_parameters() if p.requires_grad]
    l2 = sum(float((p - anchor[n]).pow(2).sum()) for n, p in trained)
    assert float(l2_distance(student.encoder, anchor)) == pytest.approx(l2, rel=1e-5)
    mars = 0.0
    for name, layer in student.encoder.named_modules():
        if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
            diff = (layer.weight - anchor[f"{name}.weight"]).reshape(layer.weight.shape[0], -1)
            mars += float(diff.abs().sum(1).max())
    assert float(mars_distance(student.encoder, anchor)) == pytest.approx(mars, rel=1e-5)
    assert float(l2_distance(student.encoder, student.encoder.state_dict())) == 0


# --- prediction matching ---------------------------------------------------------------

def test_vit_prediction_matching_targets_the_teachers_reconstruction_of_the_same_masked_input():
    from raysd.objectives import distill_step

    student, teacher = _vit(0), _vit(1).eval()
    cfg = tiny_config({"self_distill.mae_weight": 0.5}, method="match_predictions").effective()
    step_loss, _ = distill_step(student, teacher, None, StageRun(cfg, Hooks(), "self_distill", 1))
    batch = _images()
    torch.manual_seed(5)
    loss, parts = step_loss(batch)
    torch.manual_seed(5)
    masking = student.draw_masking(batch, cfg.mask_ratio)
    pred, target = student.predict(batch, masking), teacher.predict(batch, masking)
    mask = masking["mask"]
    match = (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()
    torch.testing.assert_close(parts["distill_loss"], match)
    torch.testing.assert_close(loss, 0.5 * student.reconstruction_loss(pred, batch, masking) + match)
    assert masked_mse(pred, pred, mask) == 0


def test_roberta_prediction_matching_is_kl_teacher_to_student_over_masked_tokens():
    torch.manual_seed(0)
    teacher, student = torch.randn(6, 11), torch.randn(6, 11, requires_grad=True)
    expected = F.kl_div(F.log_softmax(student, -1), F.softmax(teacher, -1), reduction="batchmean")
    torch.testing.assert_close(token_kl(teacher, student), expected)
    token_kl(teacher, student).backward()
    assert student.grad is not None


def test_roberta_predictions_and_r3f_run_on_a_tiny_text_model():
    from raysd.objectives import distill_step

    torch.manual_seed(0)
    student = models.build("roberta_tiny")
    teacher = copy.deepcopy(student).eval()
    enc = student.tokenizer(["Return a logger.", "Parse an XML document now."], padding="max_length",
                            max_length=16, return_tensors="pt")
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "y": torch.tensor([0, 1])}
    cfg = tiny_config(model="roberta_tiny", method="match_predictions").effective()
    step_loss, _ = distill_step(student, teacher, None, StageRun(cfg, Hooks(), "self_distill", 1))
    student.eval()  # no dropout: a student equal to its teacher matches it exactly
    loss, parts = step_loss(batch)
    assert float(parts["distill_loss"]) == pytest.approx(0.0, abs=1e-6) and float(parts["mae_loss"]) > 0
    logits = models.Classifier(student, 3)(batch, perturb=embedding_noise("normal", 1e-5))
    assert logits.shape == (4, 3)


# --- the ablations' stage keys ---------------------------------------------------------

def _keys(cfg, task):
    cfg = cfg.effective()
    fp, _ = stage_key("root", cfg, "further_pretrain", 0, Hooks(), task)
    sd, _ = stage_key(fp, cfg, "self_distill", 1, Hooks(), task)
    return fp, sd


def test_every_method_has_a_plan():
    assert set(METHODS) == set(PLANS)
    assert tiny_config({"recadam.pretrain_coef": 100}, method="recadam").stages() == [("finetune", 0)]
    assert tiny_config(method="further_pretrain_2x").stages() == [("further_pretrain", 0), ("finetune", 0)]
    assert tiny_config(method="no_mae").stages()[1] == ("self_distill", 1)


def test_ablations_share_the_stages_they_compute_alike_and_only_those(digits):
    fp, sd = _keys(tiny_config(method="self_distill"), digits)
    fp0, sd0 = _keys(tiny_config({"self_distill.mae_weight": 0.0}, method="self_distill"), digits)
    assert _keys(tiny_config(method="no_mae"), digits) == (fp, sd0) and sd0 != sd
    fp2, _ = _keys(tiny_config({"further_pretrain.steps": 8}, method="further_pretrain"), digits)
    assert _keys(tiny_config(method="further_pretrain_2x"), digits)[0] == fp2 != fp
    matched = {m: _keys(tiny_config(method=m), digits) for m in
               ("match_predictions", "match_weights_l2", "match_weights_mars")}
    assert {f for f, _ in matched.values()} == {fp}  # theta_0 is shared
    assert len({s for _, s in matched.values()} | {sd, sd0}) == 5  # each target its own round
    for method in ("match_predictions", "match_weights_l2"):
        assert _keys(tiny_config(method=method), digits) == _keys(
            tiny_config({"self_distill.target": method.replace("match_", "")}), digits)


def test_a_weight_target_is_keyed_without_the_teacher_cache(digits):
    keys = {_keys(tiny_config({"self_distill.teacher_cache": c}, method="match_weights_l2"), digits)[1]
            for c in ("on", "off")}
    assert len(keys) == 1


def test_the_objectives_code_is_part_of_every_key():
    """A round's objective lives in objectives.py and regularisers.py: editing either must not
    reuse artifacts built by the old code."""
    from raysd.artifacts import METHOD_CODE

    assert {"objectives", "regularisers"} <= set(METHOD_CODE)
