"""ViT backbone: equivalence with transformers' ViTMAE, weight sources, the demo's init."""
import pytest
import torch

from raysd import models
from raysd.errors import ConfigError
from raysd.losses import shuffle_mask
from raysd.models.weights import load_backbone, save_backbone


def _hf_vit_tiny(tmp_path):
    """A random transformers ViTMAE with vit_tiny's shape, saved like a hub checkpoint."""
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
    hf = ViTMAEForPreTraining(cfg).eval()
    hf.save_pretrained(tmp_path)
    return hf


def test_hf_vitmae_checkpoint_loads_with_identical_outputs(tmp_path):
    hf = _hf_vit_tiny(tmp_path)
    ours = load_backbone("vit_tiny", str(tmp_path)).eval()
    torch.manual_seed(1)
    images, noise = torch.randn(4, 3, 32, 32), torch.rand(4, 64)
    ids_keep, _, _ = shuffle_mask(4, 64, 0.75, noise=noise)
    with torch.no_grad():
        hf_out = hf(pixel_values=images, noise=noise)
        hf_latent = hf.vit(pixel_values=images, noise=noise).last_hidden_state
        assert torch.allclose(ours.encode(images, ids_keep), hf_latent, atol=1e-5)
        assert torch.allclose(ours.mae_loss({"x": images}, 0.75, noise=noise), hf_out.loss, atol=1e-5)
        # decoder too: the reconstruction of every patch
        assert torch.allclose(ours.decoder(ours.encode(images, ids_keep), hf_out.ids_restore),
                              hf_out.logits, atol=1e-5)


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
