"""The text demo: roberta_tiny's `builtin:demo` was really pre-trained (masked-LM loss on
held-out text far below a random init's), is one cached stage artifact that carries its
tokenizer, and a demo_text trial fine-tunes well above chance. The space's values are checked
against the model before Ray starts."""
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, RobertaConfig

from raysd import bootstrap
from raysd.config import StageConfig
from raysd.data import load_task
from raysd.data.corpus import demo_corpus, packed
from raysd.data.text import VOCAB_SIZE, builtin_corpus, builtin_splits, builtin_tokenizer
from raysd.errors import ConfigError
from raysd.models import roberta
from raysd.recipe import Hooks, run_trial
from raysd.checks import check_model_fit
from raysd.overrides import parse_overrides
from raysd.spaces import load_space

# The real build (bootstrap.TEXT_PRETRAIN) takes minutes; CI builds a shorter one the same way,
# long enough to leave the plateau where a masked LM predicts word frequencies only (at 200
# steps it has not, and fine-tuning from it stays near chance).
CI_PRETRAIN = StageConfig(steps=300, batch_size=64, lr=5e-3, weight_decay=0.01, warmup_steps=30,
                          beta2=0.98)
CHANCE = 1 / 6  # builtin:text has six classes


@pytest.fixture(scope="module")
def demo():
    """(theta_init, artifact key) of the text demo, built once for the module in the test
    session's cache (conftest.py)."""
    patch = pytest.MonkeyPatch()
    patch.setattr(bootstrap, "TEXT_PRETRAIN", CI_PRETRAIN)
    yield bootstrap.theta_init("roberta_tiny", "builtin:demo", seed=0), bootstrap.demo_key("roberta_tiny")
    patch.undo()


def test_corpus_holds_none_of_the_target_task_and_holds_out_text():
    texts, held_out = demo_corpus()
    target = set(builtin_corpus()[0])
    assert len(texts) > 3000 and len(held_out) > 100
    assert not (set(texts) | set(held_out)) & target
    assert not set(texts) & set(held_out)


def test_demo_init_was_pretrained_on_text_it_never_saw(demo):
    init, key = demo
    held_out = bootstrap.held_out_text(init.tokenizer)
    torch.manual_seed(0)
    random_init = roberta.tiny(init.tokenizer)
    pretrained, random = (bootstrap.held_out_mlm_loss(m, held_out) for m in (init, random_init))
    # Word frequencies alone (a unigram model of the corpus) already beat a random init; the
    # demo must beat them too, so it uses context.
    rows = packed(demo_corpus()[0], init.tokenizer, bootstrap.TEXT_MAX_LENGTH)
    special = torch.tensor(init.tokenizer.all_special_ids)
    train_ids = rows.input_ids[~torch.isin(rows.input_ids, special)]
    held_ids = held_out.input_ids[~torch.isin(held_out.input_ids, special)]
    counts = torch.bincount(train_ids, minlength=VOCAB_SIZE).double() + 0.5
    unigram = float(-(counts / counts.sum()).log()[held_ids].mean())
    assert pretrained < unigram - 0.3 < random - 1.0, (pretrained, unigram, random)
    _, meta = bootstrap.demo_store().load(key)  # the build measured the same
    assert meta["held_out_mlm_loss"] == pytest.approx(pretrained, abs=1e-4)
    assert meta["random_init_mlm_loss"] == pytest.approx(random, abs=1e-4)


def test_demo_weights_are_one_cached_artifact_with_their_own_tokenizer(demo):
    init, key = demo
    meta_file = Path(bootstrap.demo_store().uri) / key / "meta.json"
    built = meta_file.stat().st_mtime_ns
    again = bootstrap.theta_init("roberta_tiny", "builtin:demo", seed=1)
    assert meta_file.stat().st_mtime_ns == built  # loaded, not built again
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in init.state_dict().items())
    # Its tokenizer was trained on the demo corpus, not on builtin:text, and the task is
    # tokenized with it.
    assert len(init.tokenizer) == VOCAB_SIZE
    assert init.tokenizer.get_vocab() == again.tokenizer.get_vocab() != builtin_tokenizer().get_vocab()
    task = load_task("builtin:text", tokenizer=again.tokenizer, max_length=64)
    first = builtin_splits()["train"][0][0]
    expected = init.tokenizer(first, truncation=True, max_length=64)["input_ids"]
    assert task.train.input_ids[0][: len(expected)].tolist() == expected


def test_demo_text_trial_is_well_above_chance(demo):
    init, _ = demo
    space = load_space("demo_text", parse_overrides([
        "further_pretrain.steps=20", "self_distill.steps=20", "finetune.steps=200",
        "evaluation.every=0", "evaluation.signal=none"]))
    cfg = space.trial_config()
    task = load_task(cfg.data, tokenizer=init.tokenizer, max_length=cfg.max_length)
    out = run_trial(cfg, task, init, Hooks())
    assert out["val_macro_f1"] > 3 * CHANCE and out["test_macro_f1"] > 3 * CHANCE, out


def test_space_values_are_checked_against_the_model(tmp_path):
    cfg = load_space("demo_text").trial_config()
    check_model_fit(cfg, "demo_text.yaml")
    too_long = load_space("demo_text", {"max_length": 256}).trial_config()
    with pytest.raises(ConfigError, match=r"demo_text.yaml: max_length: must be at most 128.*got 256"):
        check_model_fit(too_long, "demo_text.yaml")
    # A transformers checkpoint of another vocabulary, and a tokenizer larger than the model's.
    other = tmp_path / "other_vocab"
    other.mkdir()
    RobertaConfig(vocab_size=3000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=128, max_position_embeddings=130, type_vocab_size=1,
                  layer_norm_eps=1e-5, pad_token_id=1).to_json_file(str(other / "config.json"))
    builtin_tokenizer().save_pretrained(str(other))
    with pytest.raises(ConfigError, match="vocab_size 3000 .model has 2000."):
        check_model_fit(load_space("demo_text", {"weights": str(other)}).trial_config(), "x")
    big = tmp_path / "big_tokenizer"
    builtin_tokenizer().save_pretrained(str(big))
    tokenizer = AutoTokenizer.from_pretrained(str(big))  # a copy: the builtin one is shared
    tokenizer.add_tokens([f"extra{i}" for i in range(5)])
    tokenizer.save_pretrained(str(big))
    config = json.loads((other / "config.json").read_text())
    (big / "config.json").write_text(json.dumps({**config, "vocab_size": VOCAB_SIZE}))
    with pytest.raises(ConfigError, match=f"tokenizer has {VOCAB_SIZE + 5} tokens"):
        check_model_fit(load_space("demo_text", {"weights": str(big)}).trial_config(), "x")
