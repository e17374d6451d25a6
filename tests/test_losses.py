import torch

from raysd.losses import distill_loss, mae_loss, num_visible, patchify, shuffle_mask


def test_mask_keeps_exactly_round_k_times_one_minus_gamma_visible():
    for k, ratio in [(64, 0.75), (196, 0.75), (196, 0.6), (16, 0.9), (10, 0.55)]:
        ids_keep, ids_restore, mask = shuffle_mask(8, k, ratio)
        visible = round(k * (1 - ratio))
        assert ids_keep.shape == (8, visible)
        assert (mask.sum(1) == k - visible).all()
        # ids_keep are exactly the unmasked positions, each image its own draw
        for b in range(8):
            assert set(ids_keep[b].tolist()) == set((mask[b] == 0).nonzero().flatten().tolist())
        assert ids_restore.shape == (8, k)
    assert num_visible(4, 0.99) == 1 and num_visible(4, 0.01) == 3


def test_masks_differ_between_images_and_draws():
    _, _, a = shuffle_mask(4, 64, 0.75)
    _, _, b = shuffle_mask(4, 64, 0.75)
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(a, b)


def test_mae_loss_ignores_predictions_on_visible_patches():
    images = torch.randn(2, 3, 32, 32)
    target = patchify(images, 4)
    _, _, mask = shuffle_mask(2, 64, 0.75)
    pred = torch.randn_like(target)
    changed = pred.clone()
    changed[mask == 0] += 100.0  # only visible patches change
    assert torch.equal(mae_loss(pred, target, mask), mae_loss(changed, target, mask))
    changed[mask == 1] += 1.0
    assert not torch.equal(mae_loss(pred, target, mask), mae_loss(changed, target, mask))


def test_mae_loss_targets_are_normalised_per_patch():
    images = torch.randn(1, 3, 8, 8)
    target = patchify(images, 4)
    mask = torch.ones(1, 4)
    norm = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    assert mae_loss(norm, target, mask).item() < 1e-10
    # shifting and scaling a patch leaves its normalised target unchanged
    assert torch.allclose(mae_loss(norm, target * 3 + 5, mask), torch.zeros(()), atol=1e-8)


def test_patchify_order_matches_mae():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float).reshape(2, 3, 8, 8)
    patches = patchify(images, 4)
    assert patches.shape == (2, 4, 48)
    # patch (row 0, col 1), pixel (0, 0), channel 2
    assert patches[0, 1, 2] == images[0, 2, 0, 4]


def test_distill_loss_is_batch_mean_of_squared_l2():
    s, t = torch.randn(5, 7), torch.randn(5, 7)
    assert torch.allclose(distill_loss(s, t), ((s - t) ** 2).sum(1).mean())


def test_distill_loss_zero_with_zero_gradient_when_student_equals_teacher():
    s = torch.randn(4, 16, requires_grad=True)
    t = s.detach().clone().requires_grad_(True)
    loss = distill_loss(s, t)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(s.grad) == 0
    assert t.grad is None  # StopGrad: nothing flows into the teacher
