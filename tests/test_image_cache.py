"""Image folders are decoded once into a uint8 cache: the same tensors as torchvision's
ImageFolder path, no decoding afterwards, a new cache when an image changes, DataError naming a
corrupt file, the same held-out val split, and replayable augmentation."""
import os
import pickle
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from raysd.data import DataError, load_task
from raysd.data.images import MEAN, STD, split_indices
from raysd.data.loader import Seeded, step_batches

SIZE = 12
CLASSES = ["ant", "bee", "cat"]
SHAPES = [(20, 14), (13, 25), (16, 16), (31, 22), (12, 40)]  # (width, height): crops both ways


def _folder(root, splits=(("train", 5), ("val", 2), ("test", 2))):
    """Random-noise images (so equal tensors mean the same image), PNG and JPEG, of many sizes."""
    rng = np.random.default_rng(0)
    for split, per_class in splits:
        for name in CLASSES:
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                w, h = SHAPES[i % len(SHAPES)]
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYSD_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "images"


def _load(root):
    return load_task(f"imagefolder:{root}", image_size=SIZE, augment="rrc")


def _old(root, split):
    """What the code before the cache gave: torchvision's ImageFolder with train's classes."""
    from torchvision import datasets, transforms

    plain = transforms.Compose([
        transforms.Resize(SIZE), transforms.CenterCrop(SIZE), transforms.ToTensor(),
        transforms.Normalize(MEAN.flatten().tolist(), STD.flatten().tolist()),
    ])

    class TrainIndexed(datasets.ImageFolder):
        def find_classes(self, directory):
            return CLASSES, {name: i for i, name in enumerate(CLASSES)}

    return TrainIndexed(str(root / split), transform=plain)


def _stack(dataset):
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([item["x"] for item in items]), [item["y"] for item in items]


def _cache_dir(task):
    return task.test.path.parent


def test_cached_views_equal_torchvisions(tmp_path):
    root = _folder(tmp_path / "data")
    task = _load(root)
    for split, ours in (("train", task.unlabelled), ("val", task.val), ("test", task.test)):
        old = _old(root, split)
        x, y = _stack(ours)
        expected = torch.stack([old[i][0] for i in range(len(old))])
        assert y == [label for _, label in old.samples]
        # Exact up to float rounding: PIL's resize already rounds to uint8, as the cache stores.
        torch.testing.assert_close(x, expected, atol=1e-5, rtol=0)
    x, y = _stack(task.train)  # the fine-tuning view: augmented, same labels and shape
    assert x.shape == (15, 3, SIZE, SIZE) and y == _stack(task.unlabelled)[1]
    assert not torch.allclose(x, _stack(task.unlabelled)[0])


def test_a_built_cache_is_read_without_decoding(tmp_path, monkeypatch):
    root = _folder(tmp_path / "data")
    first = _cache_dir(_load(root))

    def no_decoding(*args, **kwargs):
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(Image, "open", no_decoding)
    task = _load(root)
    assert _cache_dir(task) == first
    for dataset in (task.train, task.unlabelled, task.val, task.test):
        _stack(dataset)


def test_a_changed_or_added_image_makes_a_new_cache(tmp_path, cache):
    root = _folder(tmp_path / "data")
    tasks = [_load(root)]
    first = _cache_dir(tasks[0])
    built = (first / "train.npy").stat().st_mtime_ns
    assert _cache_dir(_load(root)) == first and (first / "train.npy").stat().st_mtime_ns == built

    image = root / "test" / "bee" / "0.jpg"
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    tasks.append(_load(root))
    touched = _cache_dir(tasks[-1])
    Image.new("RGB", (9, 9)).save(root / "train" / "ant" / "new.png")
    added = _load(root)
    tasks.append(added)
    assert len({first, touched, _cache_dir(added)}) == 3 and len(added.unlabelled) == 16
    # The task's fingerprint (in every artifact key) is the cache's: it follows the images too.
    assert len({task.fingerprint for task in tasks}) == 3
    assert _load(root).fingerprint == added.fingerprint
    assert sorted(p.name for p in cache.iterdir() if p.is_dir()) == sorted(
        p.name for p in (first, touched, _cache_dir(added)))  # no half-built folder left


def test_concurrent_loads_wait_for_one_builder(tmp_path, monkeypatch):
    from raysd.data import images

    root = _folder(tmp_path / "data")
    decoded, decode = [], images._decode

    def counted(path, plain):
        decoded.append(path)
        time.sleep(0.01)  # a build long enough for the other loads to arrive during it
        return decode(path, plain)

    monkeypatch.setattr(images, "_decode", counted)
    with ThreadPoolExecutor(3) as pool:
        dirs = {_cache_dir(task) for task in pool.map(lambda _: _load(root), range(3))}
    assert len(dirs) == 1 and sorted(decoded) == sorted(map(str, root.rglob("*.*g")))


@pytest.mark.parametrize("content", [b"not an image", "truncated"])
def test_a_corrupt_image_is_a_data_error_naming_it(tmp_path, cache, content):
    root = _folder(tmp_path / "data")
    bad = root / "val" / "cat" / "1.png"
    if content == "truncated":
        content = bad.read_bytes()[:100]
    bad.write_bytes(content)
    with pytest.raises(DataError, match="cannot read image") as err:
        _load(root)
    assert str(bad) in str(err.value)
    assert not [p for p in cache.iterdir() if p.is_dir()]  # nothing half-built is left to be used


def test_without_val_the_same_images_are_held_out(tmp_path):
    root = _folder(tmp_path / "data", splits=(("train", 5), ("test", 2)))
    task = _load(root)
    old = _old(root, "train")
    train_idx, val_idx = split_indices(len(old), (0.9,))
    for ours, indices in ((task.val, val_idx), (task.unlabelled, train_idx)):
        x, y = _stack(ours)
        assert len(ours) == len(indices) and y == [old.samples[i][1] for i in indices]
        torch.testing.assert_close(x, torch.stack([old[i][0] for i in indices]), atol=1e-5, rtol=0)


def test_augmentation_is_a_function_of_seed_step_and_rank(tmp_path):
    train = _load(_folder(tmp_path / "data")).train

    def batch(step, start, rank=0):
        torch.manual_seed(start)  # the global RNG's state before a (resumed) stage must not matter
        batches = step_batches(train, 4, seed=7, start=start, stop=step + 1, rank=rank, world=2)
        return list(batches)[-1]

    once, resumed = batch(3, 0), batch(3, 3)
    assert torch.equal(once["x"], resumed["x"]) and torch.equal(once["y"], resumed["y"])
    assert not torch.equal(once["x"], batch(2, 0)["x"])
    assert not torch.equal(once["x"], batch(3, 3, rank=1)["x"])
    state = torch.get_rng_state()
    item = Seeded(train)[(0, 5)]
    assert torch.equal(torch.get_rng_state(), state)  # the recipe's own draws are left alone
    assert torch.equal(Seeded(train)[(0, 5)]["x"], item["x"])


def test_a_loader_worker_gets_the_file_not_the_mapping(tmp_path):
    test = _load(_folder(tmp_path / "data")).test
    x = test[0]["x"]
    copy = pickle.loads(pickle.dumps(test))
    assert len(pickle.dumps(test)) < 2000 and torch.equal(copy[0]["x"], x)


def test_an_image_over_pillows_pixel_limit_is_a_data_error_naming_it(tmp_path, cache, monkeypatch):
    """Pillow's decompression-bomb guard raised its own error (no OSError): a traceback, and
    Ray Train retried the trial. The limit is lowered so that the 31x22 images trip it."""
    import re

    root = _folder(tmp_path / "data")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # Pillow errors beyond twice the limit
    with pytest.raises(DataError, match="Pillow's decompression-bomb guard") as err:
        _load(root)
    assert re.search(rf"{re.escape(str(root))}/train/\w+/3\.png: .*682 pixels", str(err.value)), err.value
    assert "\n" not in str(err.value)
    assert not [p for p in cache.iterdir() if p.is_dir()]


def test_squash_resizes_both_sides_as_the_reference_does(tmp_path):
    from torchvision import datasets, transforms

    root = _folder(tmp_path / "data")
    task = load_task(f"imagefolder:{root}", image_size=SIZE, image_resize="squash")
    squash = transforms.Compose([transforms.Resize((SIZE, SIZE)), transforms.ToTensor(),
                                 transforms.Normalize(MEAN.flatten().tolist(), STD.flatten().tolist())])
    old = datasets.ImageFolder(str(root / "test"), transform=squash)
    for i in range(len(old)):
        torch.testing.assert_close(task.test[i]["x"], old[i][0], atol=1.5 / 255 / 0.224, rtol=0)
    cropped = load_task(f"imagefolder:{root}", image_size=SIZE)
    assert not torch.equal(cropped.test[0]["x"], task.test[0]["x"])  # its own cache


def test_val_fraction_0_uses_all_of_train_and_a_search_needs_val(tmp_path):
    from raysd.data import check_source
    from raysd.errors import ConfigError

    root = _folder(tmp_path / "data", splits=(("train", 5), ("test", 2)))
    task = load_task(f"imagefolder:{root}", image_size=SIZE, val_fraction=0)
    assert len(task.unlabelled) == len(task.train) == 15 and len(task.val) == 0
    check_source(f"imagefolder:{root}", min_train=4, val_fraction=0)  # a single run may
    with pytest.raises(ConfigError, match="val_fraction is 0 and .*val does not exist"):
        check_source(f"imagefolder:{root}", min_train=4, val_fraction=0, selects=True)
    check_source(f"imagefolder:{_folder(tmp_path / 'with_val')}", min_train=4, val_fraction=0, selects=True)
    from raysd.stages import metrics_from_confusion  # an empty split measures nothing, not a crash

    assert all(v != v for v in metrics_from_confusion(torch.zeros(3, 3), 0.0, ("accuracy",)).values())
