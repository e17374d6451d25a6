"""ViT backbone: equivalence with transformers' ViTMAE, weight sources, the demo's init."""
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from raysd import models
from raysd.errors import ConfigError
from raysd.losses import shuffle_mask
from raysd.models import weights as loader
from raysd.models.vit import MaeViT, build_encoder
from raysd.models.weights import check_weights, load_backbone, save_backbone


def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random, none left at a constant init (zero biases and position or mask
    tokens, unit LayerNorm weights) under which a swapped or dropped tensor would go unseen."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # includes the frozen sin-cos position embeddings
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    assert all(p.unique().numel() > 1 for p in model.parameters())
    return model


def _hf_vit_tiny(tmp_path):
    """A random transformers ViTMAE with vit_tiny's shape, every tensor random, saved like a hub checkpoint."""
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    spec = models.VIT_SPECS["vit_tiny"]
    cfg = ViTMAEConfig(
        image_size=spec.img_size, patch_size=spec.patch_size, hidden_size=spec.embed_dim,
        num_hidden_layers=spec.depth, num_attention_heads=spec.num_heads,
        intermediate_size=int(spec.embed_dim * spec.mlp_ratio), decoder_hidden_size=spec.decoder_dim,
        decoder_num_hidden_layers=spec.decoder_depth, decoder_num_attention_heads=spec.decoder_heads,
        decoder_intermediate_size=int(spec.decoder_dim * spec.mlp_ratio), layer_norm_eps=spec.norm_eps,
        norm_pix_loss=True, mask_ratio=0.75,
    )
    torch.manual_seed(0)
    hf = _randomise(ViTMAEForPreTraining(cfg), seed=0).eval()
    hf.save_pretrained(tmp_path)  # position embeddings and mask token are saved, and loaded back
    return hf


@pytest.fixture(scope="module")
def hf_vit(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_vit")
    return _hf_vit_tiny(path), path


def _vit_mismatches(hf, ours) -> dict[str, float]:
    """Each output on which raysd's model and transformers' differ beyond float tolerance, with
    the largest difference; {} when they agree. Shared by the equivalence and mutation tests."""
    torch.manual_seed(1)
    images, noise = torch.randn(4, 3, 32, 32), torch.rand(4, 64)
    ids_keep, _, _ = shuffle_mask(4, 64, 0.75, noise=noise)
    config = hf.vit.embeddings.config
    with torch.no_grad():
        theirs = hf(pixel_values=images, noise=noise)
        latent = hf.vit(pixel_values=images, noise=noise).last_hidden_state
        ratio, config.mask_ratio = config.mask_ratio, 0.0  # every patch, in order: what represent() sees
        try:
            full = hf.vit(pixel_values=images, noise=torch.arange(64.0).expand(4, -1)).last_hidden_state
        finally:
            config.mask_ratio = ratio
        pairs = {
            "full-image encoding": (ours.encode(images), full),
            "masked encoding": (ours.encode(images, ids_keep), latent),
            # fed transformers' latent, so that a mismatch here is the decoder's own
            "decoder reconstruction": (ours.decoder(latent, theirs.ids_restore), theirs.logits),
            "MAE loss": (ours.mae_loss({"x": images}, 0.75, noise=noise), theirs.loss),
        }
    return {name: (a - b).abs().max().item() for name, (a, b) in pairs.items()
            if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-4, atol=1e-5)}


def test_hf_vitmae_checkpoint_loads_with_identical_outputs(hf_vit):
    hf, path = hf_vit
    ours = load_backbone("vit_tiny", str(path)).eval()
    assert _vit_mismatches(hf, ours) == {}


# Bugs the comparison above must catch, each injected into raysd's loader or model. Under
# transformers' own init (zero biases, CLS, mask token and both position embeddings, unit
# LayerNorm weights) all four would pass unseen: _vit_mismatches finds nothing.
def _norms_swapped(monkeypatch):
    """The loader maps layernorm_before to norm2 and layernorm_after to norm1, in every block."""
    before, after = loader.VIT_LAYER_KEYS["norm1"], loader.VIT_LAYER_KEYS["norm2"]
    monkeypatch.setitem(loader.VIT_LAYER_KEYS, "norm1", after)
    monkeypatch.setitem(loader.VIT_LAYER_KEYS, "norm2", before)


def _converted(monkeypatch, edit):
    """Let `edit` change the state dict the loader converted from transformers'."""
    convert = loader.vit_state_from_hf

    def buggy(hf, **kwargs):
        out = convert(hf, **kwargs)
        edit(out)
        return out

    monkeypatch.setattr(loader, "vit_state_from_hf", buggy)


def _qk_biases_swapped(monkeypatch):
    """The q and k chunks of every fused qkv bias trade places (weights stay right)."""
    def swap(state):
        for key in [k for k in state if k.endswith("attn.qkv.bias")]:
            q, k, v = state[key].chunk(3)
            state[key] = torch.cat([k, q, v])

    _converted(monkeypatch, swap)


def _pos_embed_after_masking(monkeypatch):
    """The encoder adds position embeddings to the kept patches after masking: the first V
    positions, not the kept patches' own."""
    def encode(self, images, ids_keep=None):
        enc = self.encoder
        x = enc.patch_embed(images)
        if ids_keep is not None:
            x = x.gather(1, ids_keep[..., None].expand(-1, -1, x.shape[-1]))
        x = x + enc.pos_embed[:, 1:1 + x.shape[1]]
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        return enc.norm(enc.blocks(enc.norm_pre(torch.cat([cls, x], dim=1))))

    monkeypatch.setattr(MaeViT, "encode", encode)


def _decoder_without_pos_embed(monkeypatch):
    """The decoder adds no position embedding (its pos_embed all zeros)."""
    def drop(state):
        state["decoder.pos_embed"] = torch.zeros_like(state["decoder.pos_embed"])

    _converted(monkeypatch, drop)


ALL = {"full-image encoding", "masked encoding", "decoder reconstruction", "MAE loss"}


@pytest.mark.parametrize("inject,caught_by", [
    (_norms_swapped, ALL),
    (_qk_biases_swapped, ALL),
    (_pos_embed_after_masking, {"masked encoding", "MAE loss"}),
    (_decoder_without_pos_embed, {"decoder reconstruction", "MAE loss"}),
], ids=["norm1-norm2-swapped", "q-k-biases-swapped", "pos-embed-after-masking", "decoder-without-pos-embed"])
def test_vit_equivalence_check_catches_injected_bugs(hf_vit, monkeypatch, inject, caught_by):
    hf, path = hf_vit
    inject(monkeypatch)
    ours = load_backbone("vit_tiny", str(path)).eval()
    mismatches = _vit_mismatches(hf, ours)
    assert set(mismatches) == caught_by, mismatches
    assert min(mismatches.values()) > 1e-3, mismatches  # far beyond float noise


def _edited_checkpoint(src, dst, edit):
    """Copy the checkpoint directory `src` to `dst` with `edit` applied to its tensors."""
    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    edit(state)
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_encoder_only_checkpoint_is_a_config_error(hf_vit, tmp_path):
    hf, _ = hf_vit
    hf.vit.save_pretrained(tmp_path)  # a ViTMAEModel: no decoder, no mask token
    with pytest.raises(ConfigError, match=r"24 missing: decoder\.decoder_embed\.bias, .* and 20 more"):
        load_backbone("vit_tiny", str(tmp_path))


def test_hf_checkpoint_with_an_extra_tensor_is_a_config_error(hf_vit, tmp_path):
    _, path = hf_vit
    extra = _edited_checkpoint(path, tmp_path / "extra", lambda s: s.update({"vit.extra.weight": torch.ones(3)}))
    with pytest.raises(ConfigError, match=r"1 unexpected: vit\.extra\.weight"):
        load_backbone("vit_tiny", str(extra))


def test_vit_conversion_leaves_no_transformers_tensor_behind(hf_vit):
    """A tensor the converter does not know (a newer transformers' name, say) is an error, not dropped."""
    hf, _ = hf_vit
    state = hf.state_dict()
    assert loader.vit_state_from_hf(state).keys() == models.build("vit_tiny").state_dict().keys()
    with pytest.raises(ConfigError, match=r"1 not converted: vit\.layers\.0\.attention\.q_norm\.weight"):
        loader.vit_state_from_hf({**state, "vit.layers.0.attention.q_norm.weight": torch.ones(64)})


@pytest.mark.parametrize("edit,message", [
    (lambda s: s.pop("decoder.mask_token"), r"1 missing: decoder\.mask_token"),
    (lambda s: s.update({"decoder.extra": torch.ones(2)}), r"1 unexpected: decoder\.extra"),
], ids=["missing", "unexpected"])
def test_raysd_checkpoint_with_missing_or_extra_tensors_is_a_config_error(tmp_path, edit, message):
    save_backbone(models.build("vit_tiny"), tmp_path / "saved", "vit_tiny")
    _edited_checkpoint(tmp_path / "saved", tmp_path / "edited", edit)
    with pytest.raises(ConfigError, match=message):
        check_weights("vit_tiny", str(tmp_path / "edited"))
    with pytest.raises(ConfigError, match=message):
        load_backbone("vit_tiny", str(tmp_path / "edited"))


def test_timm_weights_load_the_encoder_and_say_the_decoder_starts_fresh(monkeypatch, caplog):
    import timm

    torch.manual_seed(0)
    source = build_encoder(models.VIT_SPECS["vit_tiny"])
    monkeypatch.setattr(timm, "create_model", lambda name, pretrained, num_classes: source)
    with caplog.at_level("INFO", logger="raysd"):
        loaded = load_backbone("vit_tiny", "timm:vit_tiny_test")
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in loaded.encoder.state_dict().items())
    lines = [r.getMessage() for r in caplog.records if r.name == "raysd"]
    assert len(lines) == 1 and "decoder starts fresh" in lines[0], lines

    source.head = torch.nn.Linear(64, 10)  # a classifier the encoder has no place for
    with pytest.raises(ConfigError, match=r"2 unexpected: head\.bias, head\.weight"):
        load_backbone("vit_tiny", "timm:vit_tiny_test")


def test_raysd_format_round_trip(tmp_path):
    torch.manual_seed(0)
    model = models.build("vit_tiny")
    save_backbone(model, tmp_path / "w", "vit_tiny")
    loaded = load_backbone("vit_tiny", str(tmp_path / "w"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


@pytest.mark.parametrize("model,weights,message", [
    ("vit_huge", "none", "unknown model 'vit_huge'"),
    ("vit_tiny", "/does/not/exist", "not a directory"),
    ("vit_small", "SAVED", "saved for model 'vit_tiny'"),
])
def test_bad_weights_are_one_clear_error(tmp_path, model, weights, message):
    save_backbone(models.build("vit_tiny"), tmp_path / "saved", "vit_tiny")
    with pytest.raises(ConfigError, match=message):
        load_backbone(model, weights.replace("SAVED", str(tmp_path / "saved")))


def test_hf_checkpoint_of_another_shape_is_rejected(tmp_path):
    _hf_vit_tiny(tmp_path)
    with pytest.raises(ConfigError, match="do not fit"):
        load_backbone("vit_small", str(tmp_path))


def test_encoder_sees_only_visible_patches_during_mae():
    model = models.build("vit_tiny")
    seen = []
    model.encoder.blocks[0].register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    model.mae_loss({"x": torch.randn(2, 3, 32, 32)}, 0.75)
    model.represent({"x": torch.randn(2, 3, 32, 32)})
    assert seen == [1 + 16, 1 + 64]  # CLS + visible patches, then CLS + all patches


def test_demo_init_is_mae_pretrained_and_cached(tmp_path, monkeypatch):
    from raysd import bootstrap
    from raysd.config import StageConfig

    monkeypatch.setenv("RAYSD_CACHE", str(tmp_path))
    monkeypatch.setattr(bootstrap, "PRETRAIN", StageConfig(steps=40, batch_size=32, lr=1.5e-3, beta2=0.95))
    monkeypatch.setattr(bootstrap, "CROPS", 256)
    demo = bootstrap.theta_init("vit_tiny", "builtin:demo", seed=0)
    store, key = bootstrap.demo_store(), bootstrap.demo_key("vit_tiny")
    _, meta = store.load(key)
    # It was really pre-trained: the MAE loss fell during the build (10 steps vs the last)...
    assert meta["row"]["mae_loss"] < 0.9 * meta["first_row"]["mae_loss"], meta
    # ...and the model it gives is the one the build trained, not the random init it began from.
    weights, _ = store.load(key)
    assert all(torch.equal(v, weights[k]) for k, v in demo.state_dict().items())
    # Cached: a second call builds nothing.
    meta_file = tmp_path / "artifacts" / key / "meta.json"
    mtime = meta_file.stat().st_mtime_ns
    again = bootstrap.theta_init("vit_tiny", "builtin:demo", seed=1)
    assert meta_file.stat().st_mtime_ns == mtime
    assert torch.equal(again.state_dict()["encoder.pos_embed"], demo.state_dict()["encoder.pos_embed"])


def test_the_model_registry_is_config_model_families():
    """config.MODEL_FAMILIES (torch-free, what configs are checked against) names exactly the
    models raysd.models builds, each in its family."""
    from raysd.config import MODEL_FAMILIES

    assert {name: models.family(name) for name in models.names()} == MODEL_FAMILIES
