"""theta_init for a trial, and the demos' (theta_init, phi_init): tiny models honestly
pre-trained by raysd on general-domain data that ships with the install.

  ViT models     MAE on crops of scikit-learn's sample photographs
  roberta_tiny   masked LM on the standard library's docstrings (raysd.data.corpus), with a
                 byte-level BPE trained on the same text; the tokenizer is saved with the
                 weights, so the target task is tokenized with it

Each is built on first use as a stage artifact in the machine's cache, so concurrent trials
wait for one builder and never build it twice."""
from __future__ import annotations

import os
import socket
import time

import torch
from torch import nn

from raysd import __version__, models
from raysd.artifacts import ArtifactStore, code_version, digest, library_versions
from raysd.cache import cache_root
from raysd.config import LoggingConfig, StageConfig, TrialConfig
from raysd.data.corpus import corpus_fingerprint, demo_corpus, packed
from raysd.data.images import TensorImages, natural_crops
from raysd.data.text import TokenizedText, tokenizer_from_json, tokenizer_recipe, train_tokenizer
from raysd.models.weights import check_weights, load_backbone
from raysd.stages import Hooks, StageRun, further_pretrain

# Everything here is part of a demo artifact's key: change one and a new artifact is built.
PRETRAIN = StageConfig(steps=600, batch_size=128, lr=1.5e-3, weight_decay=0.05, warmup_steps=50,
                       beta2=0.95)
CROPS, MASK_RATIO, SEED = 8192, 0.75, 0
# roberta_tiny: rows of 128 tokens (every position the model has), 30 % masked (a tiny model
# learns faster from more targets per row than from RoBERTa's 15 %) and no dropout (it
# under-fits; without dropout a step is also 2.5x faster on CPU). Trials keep RoBERTa's 0.1.
TEXT_PRETRAIN = StageConfig(steps=1600, batch_size=64, lr=1e-2, weight_decay=0.01, warmup_steps=80,
                            beta2=0.98)
TEXT_MASK_RATIO, TEXT_MAX_LENGTH, TEXT_DROPOUT = 0.3, 128, 0.0


def theta_init(model_name: str, weights: str, seed: int) -> nn.Module:
    """The trial's (theta_init, phi_init). `weights: none` is drawn from the trial seed, so every
    rank and every restart draws the same."""
    if weights == "builtin:demo":
        theta, meta = demo_theta(model_name)
        if models.family(model_name) == "vit":
            backbone = models.build(model_name)
        else:
            from raysd.models import roberta  # transformers: only where a text model is built

            backbone = roberta.tiny(tokenizer_from_json(meta["tokenizer"]))
        backbone.load_state_dict(theta)
        return backbone
    torch.manual_seed(seed)
    return load_backbone(model_name, weights)


def demo_store() -> ArtifactStore:
    return ArtifactStore(str(cache_root() / "artifacts"), owner=f"{socket.gethostname()}-{os.getpid()}")


def demo_key(model_name: str) -> str:
    if models.family(model_name) == "vit":
        recipe = {"stage": PRETRAIN, "crops": CROPS, "mask_ratio": MASK_RATIO}
    else:
        recipe = {"stage": TEXT_PRETRAIN, "mask_ratio": TEXT_MASK_RATIO,
                  "max_length": TEXT_MAX_LENGTH, "dropout": TEXT_DROPOUT,
                  "corpus": corpus_fingerprint(), "tokenizer": tokenizer_recipe()}
    return digest({"code": code_version(), "libraries": library_versions(), "demo": model_name,
                   "seed": SEED, **recipe})


def demo_theta(model_name: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The demo's pre-trained weights for `model_name` and their meta (a text model's tokenizer
    is in it), building them if no process has."""
    check_weights(model_name, "builtin:demo")
    store, key = demo_store(), demo_key(model_name)
    while (decision := store.claim(key)) == "wait":  # another process is building it
        time.sleep(2.0)
    if decision == "build":
        with store.building(key):
            started = time.perf_counter()
            build = _build_vit if models.family(model_name) == "vit" else _build_text
            weights, meta = build(model_name)
            seconds = time.perf_counter() - started
            print(f"raysd: built the demo's {model_name} in {seconds:.0f} s", flush=True)
            store.save(key, weights, {"key": key, "model": model_name, **meta, "seconds": seconds,
                                      "raysd_version": __version__})
    return store.load(key)


def _build_vit(model_name: str) -> tuple[dict, dict]:
    print(f"raysd: pre-training the demo's {model_name} on natural-image crops (once; cached in "
          f"{cache_root() / 'artifacts'})", flush=True)
    size = models.VIT_SPECS[model_name].img_size
    crops = TensorImages(natural_crops(CROPS, size, SEED), torch.zeros(CROPS, dtype=torch.long), size)
    torch.manual_seed(SEED)
    weights, rows = _pretrain(model_name, models.build(model_name), crops, PRETRAIN, MASK_RATIO,
                              "builtin:natural_crops")
    return weights, {"first_row": rows[0], "row": rows[-1]}


def _build_text(model_name: str) -> tuple[dict, dict]:
    from raysd.models import roberta

    print(f"raysd: pre-training the demo's {model_name} on the standard library's docstrings "
          f"(once; cached in {cache_root() / 'artifacts'})", flush=True)
    texts, _ = demo_corpus()
    tokenizer = train_tokenizer(list(texts))
    rows_of_text = packed(texts, tokenizer, TEXT_MAX_LENGTH)
    torch.manual_seed(SEED)
    init = roberta.tiny(tokenizer)
    for module in init.modules():  # attention and hidden dropout alike
        if isinstance(module, nn.Dropout):
            module.p = TEXT_DROPOUT
    weights, rows = _pretrain(model_name, init, rows_of_text, TEXT_PRETRAIN, TEXT_MASK_RATIO,
                              "builtin:stdlib_docstrings")
    # What the build bought, on text it never saw: masked-LM loss against its random init's.
    held_out = held_out_text(tokenizer)
    before = held_out_mlm_loss(init, held_out)
    init.load_state_dict(weights)
    after = held_out_mlm_loss(init, held_out)
    print(f"  held-out masked-LM loss {after:.3f} (random init {before:.3f})", flush=True)
    return weights, {"first_row": rows[0], "row": rows[-1], "corpus_texts": len(texts),
                     "corpus_rows": len(rows_of_text), "held_out_mlm_loss": after,
                     "random_init_mlm_loss": before,
                     "tokenizer": tokenizer.backend_tokenizer.to_str()}


def _pretrain(model_name: str, init: nn.Module, data, stage: StageConfig, mask_ratio: float,
              source: str) -> tuple[dict, list[dict]]:
    """Masked auto-encoding from `init` with the method's own stage loop. -> (weights, rows)"""
    cfg = TrialConfig(model=model_name, weights="none", data=source, method="further_pretrain",
                      mask_ratio=mask_ratio, further_pretrain=stage, seed=SEED,
                      logging=LoggingConfig(log_every=max(1, stage.steps // 8), checkpoint_every=10**9))
    rows: list[dict] = []

    def report(metrics: dict, state) -> None:
        rows.append(metrics)
        print(f"  step {metrics['step']:5d}  loss {metrics['loss']:.4f}", flush=True)

    run = StageRun(cfg, Hooks(report=report), "further_pretrain", 0)
    weights, last = further_pretrain(init, data, run)
    print(f"  step {last['step']:5d}  loss {last['loss']:.4f}", flush=True)
    return weights, rows + [last]


def held_out_text(tokenizer) -> TokenizedText:
    """The corpus's held-out modules, in rows as pre-training saw its text."""
    return packed(demo_corpus()[1], tokenizer, TEXT_MAX_LENGTH)


@torch.no_grad()
def held_out_mlm_loss(backbone: nn.Module, data: TokenizedText, mask_ratio: float = 0.15,
                      batch_size: int = 64) -> float:
    """Masked-LM loss in nats per masked token (RoBERTa's 15 % masked), with masks drawn from
    SEED: two models of one tokenizer are scored on the same positions. Leaves the global RNG
    as it was."""
    from raysd.models.roberta import IGNORE

    was_training = backbone.training
    backbone.eval()
    total, count = 0.0, 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        for start in range(0, len(data), batch_size):
            ids = data.input_ids[start: start + batch_size]  # [B, L]
            mask = data.attention_mask[start: start + batch_size]
            corrupted, labels = backbone.mask_tokens(ids, mask, mask_ratio)
            masked = int((labels != IGNORE).sum())
            total += float(backbone.mlm_loss(corrupted, mask, labels)) * masked
            count += masked
    backbone.train(was_training)
    return total / max(count, 1)
