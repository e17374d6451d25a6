"""RoBERTa family and text data: transformers equivalence, masking, loaders, CPU trials."""
from __future__ import annotations

import copy
import importlib.util
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import RobertaConfig, RobertaForMaskedLM

from raysd import models, schema
from raysd.config import TrialConfig
from raysd.data import load_task
from raysd.data.text import BUILTIN_PACKAGES, builtin_splits
from raysd.errors import ConfigError
from raysd.losses import distill_loss
from raysd.models.weights import load_backbone, save_backbone
from raysd.recipe import Hooks, run_trial

TEXTS = ["Run the event loop until a Future is done.", "Return a logger with the given name.",
         "Parse an XML document."]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return models.build("roberta_tiny")


def _batch(backbone, texts=TEXTS, max_length=24) -> dict:
    enc = backbone.tokenizer(texts, padding="max_length", truncation=True, max_length=max_length,
                             return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random, none left at a constant init (zero biases, unit LayerNorm
    weights, zero padding rows) under which a swapped or dropped tensor would go unseen."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # tied ones once: the head's matrix is the word embeddings
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    assert all(p.unique().numel() > 1 for p in model.parameters())
    return model


def _saved_hf(tiny, path, **changes) -> RobertaForMaskedLM:
    torch.manual_seed(1)
    hf = _randomise(RobertaForMaskedLM(RobertaConfig(**{**tiny.config.to_dict(), **changes})), seed=1)
    hf.save_pretrained(str(path))
    tiny.tokenizer.save_pretrained(str(path))
    return hf.eval()


@pytest.fixture(scope="module")
def hf_roberta(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_roberta")
    return _saved_hf(tiny, path), path


def _roberta_mismatches(hf, ours) -> dict[str, float]:
    """Each output on which raysd's model and transformers' differ beyond float tolerance, with
    the largest difference; {} when they agree. Shared by the equivalence and mutation tests."""
    batch = _batch(ours)
    assert (batch["attention_mask"] == 0).any()  # padding is part of what must agree
    with torch.no_grad():
        hidden = hf(**batch, output_hidden_states=True).hidden_states[-1]
        torch.manual_seed(2)
        corrupted, labels = ours.mask_tokens(batch["input_ids"], batch["attention_mask"], 0.3)
        theirs = hf(input_ids=corrupted, attention_mask=batch["attention_mask"], labels=labels)
        mine = ours.mlm_loss(corrupted, batch["attention_mask"], labels)
        torch.manual_seed(2)  # mae_loss draws the same mask from the same global RNG state
        pairs = {
            "<s> representation": (ours.represent(batch), hidden[:, 0]),
            "last hidden states": (ours.encode(batch["input_ids"], batch["attention_mask"]), hidden),
            "LM head logits": (ours.decoder(ours.encode(corrupted, batch["attention_mask"])), theirs.logits),
            "MLM loss": (mine, theirs.loss),
            "mae_loss": (ours.mae_loss(batch, 0.3), theirs.loss),
        }
    return {name: (a - b).abs().max().item() for name, (a, b) in pairs.items()
            if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-5, atol=1e-5)}


def test_matches_transformers(hf_roberta):
    hf, path = hf_roberta
    ours = load_backbone("roberta_tiny", str(path)).eval()
    assert _roberta_mismatches(hf, ours) == {}

    # Untied: the head has its own copy of the word embeddings, equal on load.
    head, words = ours.decoder.decoder.weight, ours.encoder.embeddings.word_embeddings.weight
    assert head is not words and torch.equal(head, words)


def _norms_swapped(ours):
    """Each layer's LayerNorm after attention and the one after its MLP trade places."""
    for layer in ours.encoder.encoder.layer:
        layer.attention.output.LayerNorm, layer.output.LayerNorm = (
            layer.output.LayerNorm, layer.attention.output.LayerNorm)


def _eps_changed(ours):
    """RobertaConfig's default LayerNorm eps (1e-12) instead of the checkpoint's 1e-5."""
    for module in ours.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.eps = 1e-12


def _positions_from_zero(ours):
    """Positions counted from 0, not from padding_idx + 1 as RoBERTa does."""
    table = ours.encoder.embeddings.position_embeddings.weight
    with torch.no_grad():
        table.copy_(table.roll(ours.config.pad_token_id + 1, dims=0))


ALL = {"<s> representation", "last hidden states", "LM head logits", "MLM loss", "mae_loss"}


# Under transformers' own init (unit LayerNorm weights, zero biases) the first would pass unseen.
@pytest.mark.parametrize("inject,caught_by", [
    (_norms_swapped, ALL),
    (_eps_changed, ALL - {"MLM loss", "mae_loss"}),  # a 3e-4 change of the outputs; the loss moves less
    (_positions_from_zero, ALL),
], ids=["layernorms-swapped", "layernorm-eps-1e-12", "positions-from-zero"])
def test_roberta_equivalence_check_catches_injected_bugs(hf_roberta, inject, caught_by):
    hf, path = hf_roberta
    ours = load_backbone("roberta_tiny", str(path)).eval()
    inject(ours)
    mismatches = _roberta_mismatches(hf, ours)
    assert set(mismatches) == caught_by, mismatches
    assert min(mismatches.values()) > 1e-4, mismatches  # beyond float noise


def test_checkpoint_that_does_not_fit_is_a_config_error(tiny, tmp_path):
    _saved_hf(tiny, tmp_path, num_hidden_layers=3)
    with pytest.raises(ConfigError, match="num_hidden_layers 3"):
        load_backbone("roberta_tiny", str(tmp_path))


@pytest.mark.parametrize("edit,error", [
    (lambda s: s.update({"roberta.pooler.dense.weight": torch.ones(64, 64),
                         "roberta.pooler.dense.bias": torch.ones(64)}), None),
    (lambda s: s.update({"roberta.extra.weight": torch.ones(3)}), r"1 unexpected: roberta\.extra\.weight"),
    (lambda s: s.pop("lm_head.dense.bias"), r"missing lm_head\.dense\.bias"),
], ids=["pooler-is-fine", "extra-tensor", "missing-tensor"])
def test_checkpoint_with_extra_or_missing_tensors(hf_roberta, tmp_path, edit, error):
    """roberta-base ships a pooler the masked LM has no use for; anything else extra or
    missing is a ConfigError naming it, not a tensor silently dropped or left at init."""
    _, path = hf_roberta
    edited = tmp_path / "edited"
    shutil.copytree(path, edited)
    state = load_file(str(edited / "model.safetensors"))
    edit(state)
    save_file(state, str(edited / "model.safetensors"), metadata={"format": "pt"})
    if error is None:
        load_backbone("roberta_tiny", str(edited))
    else:
        with pytest.raises(ConfigError, match=error):
            load_backbone("roberta_tiny", str(edited))


def test_raysd_format_round_trip(tiny, tmp_path):
    save_backbone(tiny, tmp_path, "roberta_tiny")
    loaded = load_backbone("roberta_tiny", str(tmp_path)).eval()
    batch = _batch(loaded)
    with torch.no_grad():
        torch.testing.assert_close(loaded.represent(batch), copy.deepcopy(tiny).eval().represent(batch))
    assert loaded.tokenizer(TEXTS)["input_ids"] == tiny.tokenizer(TEXTS)["input_ids"]


def test_masking_follows_the_bert_recipe(tiny):
    texts = builtin_splits()["train"][0]  # ~3,800 chosen tokens at 0.15
    batch = _batch(tiny, texts, max_length=64)
    ids, attn = batch["input_ids"], batch["attention_mask"]
    special = torch.isin(ids, torch.tensor(tiny.tokenizer.all_special_ids)) | (attn == 0)
    torch.manual_seed(0)
    corrupted, labels = tiny.mask_tokens(ids, attn, 0.15)
    chosen = labels != -100
    assert not (chosen & special).any()
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(corrupted[~chosen], ids[~chosen])
    assert abs(chosen.sum().item() / (~special).sum().item() - 0.15) < 0.01
    as_mask = (corrupted[chosen] == tiny.tokenizer.mask_token_id).float().mean().item()
    kept = (corrupted[chosen] == ids[chosen]).float().mean().item()
    assert abs(as_mask - 0.8) < 0.02 and abs(kept - 0.1) < 0.02

    _, labels = tiny.mask_tokens(ids[:2], attn[:2], 1e-9)
    assert (labels != -100).sum() == 1  # never an empty mask


def _write_jsonl(path, name, rows) -> None:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    (path / name).write_text("\n".join(lines) + "\n")


def test_jsonl_task(tiny, tmp_path):
    rows = [{"text": f"example {i}", "label": ["neg", "pos", "mid"][i % 3]} for i in range(9)]
    for name in ("train.jsonl", "dev.jsonl", "test.jsonl"):
        _write_jsonl(tmp_path, name, rows)
    task = load_task(f"jsonl:{tmp_path}", tokenizer=tiny.tokenizer, max_length=16)
    assert (task.num_classes, task.modality, task.metrics) == (3, "text", ("macro_f1", "micro_f1"))
    sample = task.train[1]
    assert sample["input_ids"].shape == sample["attention_mask"].shape == (16,)
    assert sample["y"] == 2  # sorted labels: mid, neg, pos
    assert task.unlabelled is task.train

    _write_jsonl(tmp_path, "dev.jsonl", [rows[0], '{"text": "broken"', rows[1]])
    with pytest.raises(ConfigError, match=r"dev\.jsonl line 2"):
        load_task(f"jsonl:{tmp_path}", tokenizer=tiny.tokenizer)
    _write_jsonl(tmp_path, "dev.jsonl", [rows[0], {"text": "x", "label": "unseen"}])
    with pytest.raises(ConfigError, match=r"dev\.jsonl line 2: label 'unseen'"):
        load_task(f"jsonl:{tmp_path}", tokenizer=tiny.tokenizer)
    (tmp_path / "test.jsonl").unlink()
    with pytest.raises(ConfigError, match=r"test\.jsonl"):
        load_task(f"jsonl:{tmp_path}", tokenizer=tiny.tokenizer)
    with pytest.raises(ConfigError, match="no tokenizer"):
        load_task(f"jsonl:{tmp_path}", tokenizer=None)


def test_hfdisk_without_datasets_is_a_config_error(tiny, tmp_path):
    if importlib.util.find_spec("datasets") is not None:
        pytest.skip("datasets is installed")
    with pytest.raises(ConfigError, match="datasets"):
        load_task(f"hfdisk:{tmp_path}", tokenizer=tiny.tokenizer)


def test_builtin_text_task(tiny):
    task = load_task("builtin:text", tokenizer=tiny.tokenizer, max_length=32)
    sizes = (len(task.train), len(task.val), len(task.test))
    assert task.num_classes == len(BUILTIN_PACKAGES) and min(sizes) > 100
    assert {int(y) for y in task.train.labels} == set(range(task.num_classes))
    assert task.train[0]["input_ids"][0] == tiny.tokenizer.bos_token_id
    with pytest.raises(ConfigError, match="no tokenizer"):
        load_task("builtin:text", tokenizer=None)


def test_distill_loss_is_zero_between_equal_models(tmp_path):
    """Student and teacher loaded separately from one checkpoint agree exactly (each load starts
    from another random init, so a tensor the loader missed, or dropout left on, would show);
    against an independently initialised model the loss and the student's gradients are not 0."""
    torch.manual_seed(3)
    save_backbone(models.build("roberta_tiny"), tmp_path, "roberta_tiny")
    torch.manual_seed(4)
    student = load_backbone("roberta_tiny", str(tmp_path)).eval()
    torch.manual_seed(5)
    teacher = load_backbone("roberta_tiny", str(tmp_path)).eval().requires_grad_(False)
    batch = _batch(student)
    loss = distill_loss(student.represent(batch), teacher.represent(batch))
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in student.parameters())

    torch.manual_seed(6)
    stranger = models.build("roberta_tiny").eval()  # trainable: StopGrad must keep it out
    loss = distill_loss(student.represent(batch), stranger.represent(batch))
    loss.backward()
    assert loss.item() > 1.0, loss
    assert student.encoder.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in stranger.parameters())  # StopGrad on the teacher side


def _cfg(method: str, values: dict | None = None) -> TrialConfig:
    stage = {"steps": 5, "batch_size": 8, "lr": 1e-3, "beta2": 0.999}
    return schema.with_values(schema.parse(TrialConfig, {
        "model": "roberta_tiny", "weights": "none", "data": "builtin:text", "method": method,
        "mask_ratio": 0.15, "further_pretrain": stage, "self_distill": stage,
        "finetune": {**stage, "warmup_steps": 0, "grad_clip": 0.0}, "max_length": 64,
        "logging": {"log_every": 5}}, "test"), values or {})


@pytest.mark.parametrize("method", ["finetune", "further_pretrain", "self_distill"])
def test_tiny_trial(method):
    cfg = _cfg(method)
    init = load_backbone(cfg.model, cfg.weights)
    task = load_task(cfg.data, tokenizer=init.tokenizer, max_length=cfg.max_length)
    torch.manual_seed(cfg.seed)
    summary = run_trial(cfg, task, init, Hooks())
    for key in ("val_macro_f1", "test_macro_f1"):
        assert math.isfinite(summary[key]) and 0.0 <= summary[key] <= 1.0


def test_decoder_stays_put_when_mae_weight_is_zero():
    cfg = _cfg("self_distill", {"self_distill.mae_weight": 0.0})
    init = load_backbone(cfg.model, cfg.weights)
    task = load_task(cfg.data, tokenizer=init.tokenizer, max_length=cfg.max_length)
    carries = []
    hooks = Hooks(report=lambda metrics, state: carries.append(state and state.get("theta")))
    start = copy.deepcopy(init.state_dict())
    run_trial(cfg, task, init, hooks)
    student = carries[1]  # the boundary checkpoint after self-distillation round 1
    for key, value in start.items():
        moved = not torch.equal(student[key], value)
        # The head (phi) is frozen; the word embeddings it was tied to are theta and train.
        assert moved == (not key.startswith("decoder.")), key
