"""Image tasks: scikit-learn's digits (ships with the install), image folders (decoded once into
a uint8 cache per node), natural crops."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

from raysd.data.base import METRICS as MODALITY_METRICS
from raysd.data.base import DataError, Task, fingerprint_of
from raysd.errors import ConfigError

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
SPLIT_SEED = 0
METRICS = MODALITY_METRICS["image"]
CACHE_VERSION = 1  # bump when the cache's layout or decoding changes
DECODE_CHUNK = 1024


def train_augment(kind: str, size: int) -> Callable | None:
    """The fine-tuning view's augmentation (config.AUGMENTS), on [3, S, S] tensors."""
    from torchvision.transforms import v2

    if kind == "none":
        return None
    if kind == "flip":  # the reference's
        return v2.RandomHorizontalFlip()
    return v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()])


class TensorImages(Dataset):
    """In-memory images in [0, 1], [N, 3, h, w], resized to `size` and normalised per item;
    `augment` (drawing from torch's global RNG) makes a fine-tuning view."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, size: int,
                 augment: Callable | None = None):
        self.images, self.labels, self.size, self.augment = images, labels, size, augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        x = self.images[i].float()
        if x.shape[-1] != self.size:
            x = F.interpolate(x[None], size=(self.size, self.size), mode="bilinear",
                              align_corners=False)[0]
        if self.augment is not None:
            x = self.augment(x)
        return {"x": (x - MEAN) / STD, "y": int(self.labels[i])}


def split_indices(n: int, fractions: tuple[float, float], seed: int = SPLIT_SEED) -> list[np.ndarray]:
    """Fixed-seed split of range(n) into len(fractions) + 1 parts."""
    order = np.random.default_rng(seed).permutation(n)
    cuts = np.cumsum([int(round(f * n)) for f in fractions])
    return np.split(order, cuts)


def digits_task(image_size: int, augment: str = "none") -> Task:
    """scikit-learn's 8x8 digits (1,797 images, 10 classes): 60/20/20 split, fixed seed."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images / 16.0).float()[:, None].expand(-1, 3, -1, -1)
    labels = torch.from_numpy(digits.target)
    full = TensorImages(images.contiguous(), labels, image_size)
    train_idx, val_idx, test_idx = split_indices(len(full), (0.6, 0.2))
    train, val, test = (Subset(full, idx.tolist()) for idx in (train_idx, val_idx, test_idx))
    tuned = TensorImages(full.images, labels, image_size, train_augment(augment, image_size))
    return Task("builtin:digits", "image", 10, Subset(tuned, train_idx.tolist()), train, val, test,
                METRICS, tuple(str(d) for d in range(10)),
                fingerprint_of(digits.images.tobytes(), digits.target.tobytes()))


def natural_crops(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Random crops of scikit-learn's two sample photographs, as a general-domain pre-training set."""
    from sklearn.datasets import load_sample_images

    photos = [torch.from_numpy(img.copy()).permute(2, 0, 1).float() / 255 for img in load_sample_images().images]
    rng = np.random.default_rng(seed)
    crops = torch.empty(n, 3, size, size)
    for i in range(n):
        photo = photos[rng.integers(len(photos))]
        side = int(rng.integers(size, min(photo.shape[1:]) // 2))
        top = int(rng.integers(photo.shape[1] - side))
        left = int(rng.integers(photo.shape[2] - side))
        crop = photo[:, top:top + side, left:left + side]
        if rng.random() < 0.5:
            crop = crop.flip(-1)
        crops[i] = F.interpolate(crop[None], size=(size, size), mode="bilinear", antialias=True,
                                 align_corners=False)[0]
    return crops


def imagefolder_task(root: Path, image_size: int, source: str, augment: str = "flip",
                     val_fraction: float = 0.1, resize: str = "crop") -> Task:
    """DIR/train, DIR/val (split off train with a fixed seed when absent; empty when
    val_fraction is 0), DIR/test, each read from the node's uint8 cache (decoded once, by the
    first trial that needs it, squashed or cropped to size as `resize` says)."""
    root = root.resolve()
    classes = _class_folders(root, source)["train"]
    cache = image_cache(root, image_size, classes, resize)
    train_plain = CachedImages(cache, "train")
    train_aug = CachedImages(cache, "train", train_augment(augment, image_size))
    test = CachedImages(cache, "test")
    if (root / "val").is_dir():
        val = CachedImages(cache, "val")
    elif val_fraction == 0:  # the reference: all of train in every stage, no validation split
        val = Subset(train_plain, [])
    else:
        train_idx, val_idx = split_indices(len(train_plain), (1 - val_fraction,))
        val = Subset(train_plain, val_idx.tolist())
        train_plain = Subset(train_plain, train_idx.tolist())
        train_aug = Subset(train_aug, train_idx.tolist())
    # The cache's name hashes every image's path, size and mtime: the data's fingerprint, with
    # no second walk of the folder.
    return Task(source, "image", len(classes), train_aug, train_plain, val, test, METRICS,
                tuple(classes), fingerprint=cache.name)


class CachedImages(Dataset):
    """One split of an image cache: uint8 [N, 3, S, S] memory-mapped, so the trials of a node
    share one copy in the page cache. `augment` (drawing from torch's global RNG) makes the
    fine-tuning view; the result is normalised with MEAN and STD."""

    def __init__(self, cache: Path, split: str, augment: Callable | None = None):
        self.path, self.augment = cache / f"{split}.npy", augment
        self.labels = np.load(cache / f"{split}-labels.npy")
        self._images: np.ndarray | None = None

    def __getstate__(self) -> dict:
        # A loader worker maps the file itself: pickling the mapping would copy the whole split.
        return {**self.__dict__, "_images": None}

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        if self._images is None:
            self._images = np.load(self.path, mmap_mode="r")
        x = torch.from_numpy(np.array(self._images[i]))  # a copy: the mapping is read-only
        if self.augment is not None:
            x = self.augment(x)
        return {"x": (x.float() / 255 - MEAN) / STD, "y": int(self.labels[i])}


def image_cache(root: Path, image_size: int, classes: list[str], resize: str = "crop") -> Path:
    """The cache folder of `root` at `image_size`, built under a lock if no trial has yet.

    Its name hashes everything that decides its content (the root, every image's path, size and
    mtime, the classes, the size, the format and the decoders' versions): a changed or added
    image makes a new cache instead of reusing a stale one."""
    import PIL
    import torchvision
    from filelock import FileLock
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    from raysd.cache import cache_root

    # Every split takes train's class indices (_class_folders made sure the folders agree), so
    # a class is never silently relabelled.
    index = {name: i for i, name in enumerate(classes)}
    # make_dataset's order is ImageFolder's, so the held-out val split keeps its images.
    samples = {split: make_dataset(str(root / split), index, extensions=IMG_EXTENSIONS)
               for split in ("train", "val", "test") if (root / split).is_dir()}
    listing = {split: sorted(_stat(path, root) for path, _ in files)
               for split, files in samples.items()}
    # A cropped cache keeps the name it had before `resize` existed.
    fingerprint = json.dumps([CACHE_VERSION, str(root), classes, image_size, listing,
                              PIL.__version__, torchvision.__version__]
                             + ([] if resize == "crop" else [resize]))
    key = hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
    target = cache_root() / "images" / f"{root.name}-{image_size}-{key}"
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):  # the node's other trials wait for one builder
        if not target.is_dir():
            tmp = target.with_name(target.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)  # left by a builder that was killed
            tmp.mkdir()
            try:
                for split, files in samples.items():
                    _decode_split(tmp, split, files, image_size, resize)
                (tmp / "source.json").write_text(
                    json.dumps({"root": str(root), "image_size": image_size}))
                tmp.rename(target)  # atomic: a half-built cache is never read
            finally:
                shutil.rmtree(tmp, ignore_errors=True)  # a failed build leaves nothing behind
    return target


def _stat(path: str, root: Path) -> tuple[str, int, int]:
    st = os.stat(path)
    return os.path.relpath(path, root), st.st_size, st.st_mtime_ns


def _decode_split(folder: Path, split: str, files: list[tuple[str, int]], size: int,
                  resize: str = "crop") -> None:
    """{split}.npy (uint8 [N, 3, size, size]) and {split}-labels.npy, decoded on a few threads
    (PIL releases the GIL while decoding and resizing). squash: both sides to `size` (the
    reference's feature extractor); crop: the short side to `size`, then a centre crop."""
    from torchvision import transforms

    if resize == "squash":
        plain = transforms.Resize((size, size))
    else:
        plain = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size)])
    images = np.lib.format.open_memmap(folder / f"{split}.npy", mode="w+", dtype=np.uint8,
                                       shape=(len(files), 3, size, size))
    paths = [path for path, _ in files]
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        for start in range(0, len(paths), DECODE_CHUNK):  # bounds the decoded images held at once
            chunk = paths[start: start + DECODE_CHUNK]
            decoded = pool.map(_decode, chunk, [plain] * len(chunk))
            images[start: start + len(chunk)] = np.stack(list(decoded))
    images.flush()
    del images  # closes the mapping before the folder is renamed
    np.save(folder / f"{split}-labels.npy", np.array([label for _, label in files], dtype=np.int64))


def _decode(path: str, plain: Callable) -> np.ndarray:
    """The plain view of one image as uint8 [3, S, S]."""
    from torchvision.datasets.folder import pil_loader

    from PIL import Image

    try:
        image = plain(pil_loader(path))
    except (OSError, ValueError) as err:  # PIL: truncated or not an image
        raise DataError(f"{path}: cannot read image ({err})") from None
    except Image.DecompressionBombError as err:  # not an OSError: Pillow's own, raised on open
        raise DataError(f"{path}: refused by Pillow's decompression-bomb guard ({err})") from None
    return np.asarray(image).transpose(2, 0, 1)


def _class_folders(root: Path, source: str) -> dict[str, list[str]]:
    """Sorted class folders (those holding at least one image) of each split; all must agree."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    classes = {}
    for split in ("train", "val", "test"):
        folder = root / split
        if not folder.is_dir():
            if split == "val":
                continue
            raise ConfigError(f"data {source!r}: missing folder {folder}")
        classes[split] = sorted(d.name for d in folder.iterdir() if d.is_dir() and any(
            f.suffix.lower() in IMG_EXTENSIONS for f in d.rglob("*") if f.is_file()))
    for split, names in classes.items():
        if names != classes["train"]:
            missing = sorted(set(classes["train"]) ^ set(names))
            raise ConfigError(f"data {source!r}: {root / split} and {root / 'train'} must have the "
                              f"same class folders (differ in: {', '.join(missing) or 'none'})")
    return classes


def scan_imagefolder(root: Path, source: str, val_fraction: float = 0.1) -> tuple[int, int]:
    """(training examples, classes), counting files without decoding them."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    classes = _class_folders(root, source)["train"]
    files = sum(1 for c in classes for f in (root / "train" / c).rglob("*")
                if f.is_file() and f.suffix.lower() in IMG_EXTENSIONS)
    held_out = 0 if (root / "val").is_dir() else len(split_indices(files, (1 - val_fraction,))[1])
    return files - held_out, len(classes)
