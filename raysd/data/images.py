"""Image tasks: scikit-learn's digits (ships with the install), image folders, natural crops."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

from raysd.data import DataError, Task
from raysd.errors import ConfigError

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
SPLIT_SEED = 0


class TensorImages(Dataset):
    """In-memory images in [0, 1], [N, 3, h, w], resized to `size` and normalised per item."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, size: int):
        self.images, self.labels, self.size = images, labels, size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        x = self.images[i].float()
        if x.shape[-1] != self.size:
            x = F.interpolate(x[None], size=(self.size, self.size), mode="bilinear",
                              align_corners=False)[0]
        return {"x": (x - MEAN) / STD, "y": int(self.labels[i])}


def split_indices(n: int, fractions: tuple[float, float], seed: int = SPLIT_SEED) -> list[np.ndarray]:
    """Fixed-seed split of range(n) into len(fractions) + 1 parts."""
    order = np.random.default_rng(seed).permutation(n)
    cuts = np.cumsum([int(round(f * n)) for f in fractions])
    return np.split(order, cuts)


def digits_task(image_size: int) -> Task:
    """scikit-learn's 8x8 digits (1,797 images, 10 classes): 60/20/20 split, fixed seed."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images / 16.0).float()[:, None].expand(-1, 3, -1, -1)
    labels = torch.from_numpy(digits.target)
    full = TensorImages(images.contiguous(), labels, image_size)
    train, val, test = (Subset(full, idx.tolist()) for idx in split_indices(len(full), (0.6, 0.2)))
    return Task("builtin:digits", "image", 10, train, train, val, test, ("accuracy",))


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


def imagefolder_task(root: Path, image_size: int, source: str) -> Task:
    """DIR/train, DIR/val (split off train with a fixed seed when absent), DIR/test."""
    from torchvision import datasets, transforms

    plain = transforms.Compose([
        transforms.Resize(image_size), transforms.CenterCrop(image_size), transforms.ToTensor(),
        transforms.Normalize(MEAN.flatten().tolist(), STD.flatten().tolist()),
    ])
    augment = transforms.Compose([
        transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(),
        transforms.ToTensor(), transforms.Normalize(MEAN.flatten().tolist(), STD.flatten().tolist()),
    ])
    classes = _class_folders(root, source)

    class TrainIndexed(datasets.ImageFolder):
        """Every split takes train's class indices, so a class missing from one is an error
        (scan_imagefolder) and never a silent relabelling."""

        def find_classes(self, directory):
            return classes["train"], {name: i for i, name in enumerate(classes["train"])}

    def folder(split: str, transform) -> Dataset:
        return _Labelled(TrainIndexed(str(root / split), transform=transform))

    train_plain, train_aug = folder("train", plain), folder("train", augment)
    num_classes = len(classes["train"])
    test = folder("test", plain)
    if (root / "val").is_dir():
        val = folder("val", plain)
    else:
        train_idx, val_idx = split_indices(len(train_plain), (0.9,))
        val = Subset(train_plain, val_idx.tolist())
        train_plain, train_aug = Subset(train_plain, train_idx.tolist()), Subset(train_aug, train_idx.tolist())
    return Task(source, "image", num_classes, train_aug, train_plain, val, test, ("accuracy",))


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


def scan_imagefolder(root: Path, source: str) -> tuple[int, int]:
    """(training examples, classes), counting files without decoding them."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    classes = _class_folders(root, source)["train"]
    files = sum(1 for c in classes for f in (root / "train" / c).rglob("*")
                if f.is_file() and f.suffix.lower() in IMG_EXTENSIONS)
    held_out = 0 if (root / "val").is_dir() else len(split_indices(files, (0.9,))[1])
    return files - held_out, len(classes)


class _Labelled(Dataset):
    """(image, label) tuples -> raysd's {"x", "y"} samples."""

    def __init__(self, inner):
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int) -> dict:
        try:
            x, y = self.inner[i]
        except (OSError, ValueError) as err:  # PIL: truncated or not an image
            raise DataError(f"{self.inner.samples[i][0]}: cannot read image ({err})") from None
        return {"x": x, "y": y}
