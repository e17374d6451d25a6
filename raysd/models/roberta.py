"""RoBERTa family: transformers' RobertaForMaskedLM as encoder f_theta (RobertaModel) plus
decoder g_phi (the LM head), with BERT-style token masking for the masked-LM loss.

Unlike MAE, the masked LM encoder sees every position (masked ones as <mask> or a corrupted
token); the distillation representation is the last-layer <s> vector of the unmasked text.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import RobertaConfig, RobertaForMaskedLM

from raysd.errors import ConfigError
from raysd.losses import token_kl
from raysd.models.base import Backbone

IGNORE = -100  # label of an unmasked position (transformers' convention)

# The architecture of FacebookAI/roberta-base's config.json. RobertaConfig()'s own defaults
# differ (512 positions, 2 token types, eps 1e-12) and would not fit the checkpoint.
ROBERTA_BASE = dict(vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                    intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1,
                    layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2)

# Fields that must agree between a checkpoint's config and the registry entry it loads into.
ARCHITECTURE = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size", "max_position_embeddings", "type_vocab_size",
                "layer_norm_eps", "hidden_act", "pad_token_id")


def architecture_differences(saved: RobertaConfig, model: RobertaConfig) -> list[str]:
    """["vocab_size 50265 (model has 2000)", ...]: what keeps a checkpoint of config `saved`
    from loading into a model of config `model`."""
    return [f"{k} {getattr(saved, k, None)} (model has {getattr(model, k)})"
            for k in ARCHITECTURE if getattr(saved, k, None) != getattr(model, k)]


class MaskedLMRoberta(Backbone):
    """Encoder f_theta + LM head g_phi. forward() serves both DDP-wrapped training passes."""

    family = "roberta"

    def __init__(self, config: RobertaConfig, tokenizer=None):
        super().__init__()
        self.config = config
        mlm = RobertaForMaskedLM(config)
        self.encoder = mlm.roberta  # built without the pooler: f(x) is the raw <s> vector
        self.decoder = mlm.lm_head
        # Untie the LM head's output matrix from the input word embeddings (its own copy, same
        # values). Tied, that one matrix would be both theta and phi: "the decoder gets
        # gradients from L_MAE only" could not hold, and the recipe's requires_grad_(False) on
        # the decoder when lambda = 0 would also freeze the encoder's word embeddings. The cost
        # is one more vocab x hidden matrix (38.6M numbers for roberta-base) while pre-training.
        # The head's bias stays tied to lm_head.decoder.bias: both are phi.
        words = self.encoder.embeddings.word_embeddings.weight
        self.decoder.decoder.weight = nn.Parameter(words.detach().clone())
        self.tokenizer = tokenizer

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def max_length(self) -> int:
        """Longest input in tokens: RoBERTa's positions start after the padding index."""
        return self.config.max_position_embeddings - self.config.pad_token_id - 1

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last-layer hidden states [B, L, D]."""
        if input_ids.shape[1] > self.max_length:
            raise ConfigError(f"max_length {input_ids.shape[1]} exceeds this model's "
                              f"{self.max_length} positions")
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def represent(self, batch: dict, perturb: Callable | None = None) -> torch.Tensor:
        """f(x): last-layer <s> vector of the full, unmasked text, [B, D]. `perturb` maps the
        word embeddings [B, L, D] to [B', L, D] before positions are added (R3F): [B', D]."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if perturb is None:
            return self.encode(ids, mask)[:, 0]
        embeddings = self.encoder.embeddings
        words = perturb(embeddings.word_embeddings(ids))  # [B', L, D]
        times = words.shape[0] // ids.shape[0]
        # Positions as from the ids (padding keeps the padding position), not from the embeddings.
        positions = embeddings.create_position_ids_from_input_ids(ids, self.config.pad_token_id)
        return self.encoder(inputs_embeds=words, attention_mask=mask.repeat(times, 1),
                            position_ids=positions.repeat(times, 1)).last_hidden_state[:, 0]

    def mask_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    mask_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
        """BERT masking from torch's global RNG: each real, non-special token is chosen with
        probability mask_ratio (at least one per batch), then 80% <mask>, 10% random, 10% kept.

        Returns the corrupted ids [B, L] and labels [B, L] (the original id where chosen, else -100)."""
        if self.tokenizer is None:
            raise ConfigError("masked LM needs a tokenizer (for <mask>); load weights with one")
        special = torch.tensor(self.tokenizer.all_special_ids, device=input_ids.device)
        candidates = attention_mask.bool() & ~torch.isin(input_ids, special)  # [B, L]
        chosen = (torch.rand(input_ids.shape, device=input_ids.device) < mask_ratio) & candidates
        # An empty draw falls back to one random candidate; torch.where avoids a host sync.
        score = torch.rand(input_ids.shape, device=input_ids.device) * candidates
        one = torch.zeros_like(chosen).view(-1).scatter(0, score.view(-1).argmax()[None], True)
        chosen = torch.where(chosen.any(), chosen, one.view_as(chosen) & candidates)
        labels = torch.where(chosen, input_ids, IGNORE)
        action = torch.rand(input_ids.shape, device=input_ids.device)
        random_ids = torch.randint(self.config.vocab_size, input_ids.shape, device=input_ids.device)
        corrupted = torch.where(chosen & (action < 0.8), self.tokenizer.mask_token_id, input_ids)
        corrupted = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, corrupted)
        return corrupted, labels

    def mlm_loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy over the positions whose label is not -100 (transformers' MLM loss)."""
        masking, batch = {"input_ids": input_ids, "labels": labels}, {"attention_mask": attention_mask}
        return self.reconstruction_loss(self.predict(batch, masking), batch, masking)

    def draw_masking(self, batch: dict, mask_ratio: float) -> dict:
        corrupted, labels = self.mask_tokens(batch["input_ids"], batch["attention_mask"], mask_ratio)
        return {"input_ids": corrupted, "labels": labels}

    def predict(self, batch: dict, masking: dict) -> torch.Tensor:
        """LM logits at the masked positions of the corrupted text, [M, V]."""
        hidden = self.encode(masking["input_ids"], batch["attention_mask"])  # [B, L, D]
        return self.decoder(hidden[masking["labels"] != IGNORE])  # the head only where it is scored

    def reconstruction_loss(self, pred: torch.Tensor, batch: dict, masking: dict) -> torch.Tensor:
        labels = masking["labels"]
        total = F.cross_entropy(pred.float(), labels[labels != IGNORE], reduction="sum")
        return total / (labels != IGNORE).sum().clamp(min=1)  # 0, not NaN, for a batch with no real tokens

    def prediction_distance(self, student: torch.Tensor, teacher: torch.Tensor, masking: dict) -> torch.Tensor:
        """KL(p_teacher(x_t | x^) || p_student(x_t | x^)), averaged over the masked tokens."""
        return token_kl(teacher, student)

    def load_hf(self, name_or_path: str, revision: str | None = None) -> None:
        """Encoder, LM head and tokenizer from a transformers RobertaForMaskedLM (hub id or dir)."""
        try:
            hf, info = RobertaForMaskedLM.from_pretrained(name_or_path, revision=revision,
                                                          output_loading_info=True)
        except (OSError, ValueError) as err:
            raise ConfigError(f"weights {name_or_path!r}: {str(err).splitlines()[0]}") from None
        differ = architecture_differences(hf.config, self.config)
        if differ:
            raise ConfigError(f"weights {name_or_path!r}: do not fit this model ({', '.join(differ)})")
        missing = sorted(info["missing_keys"])
        if missing:
            raise ConfigError(f"weights {name_or_path!r}: not a masked-LM checkpoint (missing "
                              f"{missing[0]} and {len(missing) - 1} more)")
        self.encoder.load_state_dict(hf.roberta.state_dict())
        self.decoder.load_state_dict(hf.lm_head.state_dict())  # copies the tied matrix into ours
        self.load_tokenizer(name_or_path, revision)

    def load_tokenizer(self, name_or_path: str, revision: str | None = None) -> None:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision)
        except (OSError, ValueError) as err:
            first = str(err).splitlines()[0]
            raise ConfigError(f"weights {name_or_path!r}: no tokenizer ({first})") from None
        if tokenizer.pad_token_id != self.config.pad_token_id or tokenizer.mask_token_id is None:
            raise ConfigError(f"weights {name_or_path!r}: tokenizer needs <pad> = id "
                              f"{self.config.pad_token_id} and a <mask> token")
        if len(tokenizer) > self.config.vocab_size:
            raise ConfigError(f"weights {name_or_path!r}: tokenizer has {len(tokenizer)} tokens, "
                              f"the model {self.config.vocab_size}")
        self.tokenizer = tokenizer


def tiny(tokenizer=None) -> MaskedLMRoberta:
    """Tests and the demos: 2 layers of 64, on `tokenizer` (default: the builtin:text tokenizer,
    trained on first use). The shape never depends on the tokenizer: any of raysd's BPEs fits."""
    from raysd.data.text import VOCAB_SIZE, builtin_tokenizer

    tokenizer = builtin_tokenizer() if tokenizer is None else tokenizer
    config = RobertaConfig(vocab_size=VOCAB_SIZE, hidden_size=64, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=128,
                           max_position_embeddings=128 + 2, type_vocab_size=1, layer_norm_eps=1e-5,
                           pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id)
    return MaskedLMRoberta(config, tokenizer)


def base() -> MaskedLMRoberta:
    """roberta-base; the tokenizer arrives with the weights (`hf:roberta-base`)."""
    return MaskedLMRoberta(RobertaConfig(**ROBERTA_BASE))
