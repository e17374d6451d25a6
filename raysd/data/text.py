"""Text tasks: stdlib docstrings (ship with Python), JSONL folders, `datasets` saved to disk.

Every split is tokenised once, padded to max_length, so samples are fixed-size tensors.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import json
import pkgutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from raysd.data.base import METRICS as MODALITY_METRICS
from raysd.data.base import Task, fingerprint_dir, fingerprint_of
from raysd.data.images import split_indices
from raysd.errors import ConfigError

# builtin:text - which package a docstring comes from. Six packages with 100-300 documented
# functions, classes and methods each (about 1,200 examples on CPython 3.11).
BUILTIN_PACKAGES = ("asyncio", "email", "http", "logging", "unittest", "xml")
MIN_WORDS = 4
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")  # RoBERTa's ids 0..4
VOCAB_SIZE = 2000
TOKENIZER_VERSION = "1"  # part of the cache key: bump when training changes
METRICS = MODALITY_METRICS["text"]


class TokenizedText(Dataset):
    """Padded token ids [N, L], attention mask [N, L] and labels [N]."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor):
        self.input_ids, self.attention_mask, self.labels = input_ids, attention_mask, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i],
                "y": int(self.labels[i])}


def encode(texts: list[str], labels: list[int], tokenizer: Any, max_length: int) -> TokenizedText:
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length,
                    return_tensors="pt")
    return TokenizedText(enc["input_ids"], enc["attention_mask"], torch.tensor(labels, dtype=torch.long))


def _need_tokenizer(tokenizer: Any, source: str) -> None:
    if tokenizer is None:
        raise ConfigError(f"data {source!r}: the text model has no tokenizer; give it weights "
                          "(hf:ID or a saved directory) or use roberta_tiny")


def _task(source: str, splits: dict[str, tuple[list[str], list[int]]], labels: list,
          tokenizer: Any, max_length: int, fingerprint: str = "") -> Task:
    train, val, test = (encode(*splits[s], tokenizer, max_length) for s in ("train", "val", "test"))
    return Task(source, "text", len(labels), train, train, val, test, METRICS,
                tuple(str(label) for label in labels), fingerprint)


# ---- builtin:text ---------------------------------------------------------------------------

def _submodules(package: str) -> list[str]:
    """The package and its public submodules, sorted; `__main__` modules never (they run code)."""
    root = importlib.import_module(package)
    found = pkgutil.walk_packages(getattr(root, "__path__", []), package + ".")
    public = (m.name for m in found if not any(p.startswith("_") for p in m.name.split(".")))
    return [package, *sorted(public)]


def _docstrings(module_name: str) -> list[str]:
    """Docstrings of the functions, classes and methods defined in one module, in name order."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecated submodules warn on import
            module = importlib.import_module(module_name)
    except ImportError:  # platform-only submodules (asyncio.windows_events, ...)
        return []
    objects = []
    for name, obj in sorted(vars(module).items()):
        if not (inspect.isfunction(obj) or inspect.isclass(obj)) or obj.__module__ != module_name:
            continue
        objects.append(obj)
        if inspect.isclass(obj):  # methods defined here, not inherited
            objects += [v for _, v in sorted(vars(obj).items()) if inspect.isfunction(v)]
    docs = (obj.__doc__ for obj in objects)
    return [" ".join(d.split()) for d in docs if isinstance(d, str) and len(d.split()) >= MIN_WORDS]


@functools.lru_cache(maxsize=1)
def builtin_corpus() -> tuple[tuple[str, ...], tuple[int, ...]]:
    """(texts, labels): each docstring labelled with its package; texts found under two
    packages are dropped, repeats within one are kept once."""
    by_label = [dict.fromkeys(d for m in _submodules(package) for d in _docstrings(m))
                for package in BUILTIN_PACKAGES]
    seen: dict[str, int] = {}
    for docs in by_label:
        for text in docs:
            seen[text] = seen.get(text, 0) + 1
    pairs = [(text, label) for label, docs in enumerate(by_label) for text in docs if seen[text] == 1]
    return tuple(t for t, _ in pairs), tuple(y for _, y in pairs)


def builtin_splits() -> dict[str, tuple[list[str], list[int]]]:
    """60/20/20 split with raysd's fixed split seed."""
    texts, labels = builtin_corpus()
    parts = split_indices(len(texts), (0.6, 0.2))
    return {name: ([texts[i] for i in idx], [labels[i] for i in idx])
            for name, idx in zip(("train", "val", "test"), parts)}


@functools.lru_cache(maxsize=1)
def builtin_tokenizer():
    """Byte-level BPE trained on builtin:text's training split; built once, cached on disk."""
    from filelock import FileLock
    from transformers import PreTrainedTokenizerFast

    from raysd.cache import cache_root

    train_texts = builtin_splits()["train"][0]
    # Keyed by everything that determines the result, so a new Python (new docstrings) or a
    # new tokenizers release trains a fresh tokenizer instead of reusing a stale one.
    fingerprint = json.dumps([*tokenizer_recipe(), train_texts])
    key = hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
    target = cache_root() / "tokenizers" / f"builtin-text-{key}"
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):  # concurrent trials wait for one trainer
        if not (target / "tokenizer.json").exists():
            tmp = target.with_name(target.name + ".tmp")
            train_tokenizer(train_texts).save_pretrained(str(tmp))
            tmp.rename(target)  # atomic: a half-written cache is never read
    return PreTrainedTokenizerFast.from_pretrained(str(target))


def tokenizer_recipe() -> list:
    """What train_tokenizer's result depends on besides its texts (part of every cache key)."""
    import tokenizers

    return [TOKENIZER_VERSION, VOCAB_SIZE, SPECIAL_TOKENS, tokenizers.__version__]


def train_tokenizer(texts: list[str]):
    """A byte-level BPE of VOCAB_SIZE tokens trained on `texts`, with RoBERTa's special tokens
    at ids 0..4 and its <s> text </s> framing."""
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.processors import RobertaProcessing

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=VOCAB_SIZE, min_frequency=2,
                            special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    bpe.post_processor = RobertaProcessing(("</s>", 2), ("<s>", 0))  # <s> text </s>
    return _wrap(bpe._tokenizer)


def tokenizer_from_json(text: str):
    """A tokenizer of train_tokenizer's, back from its `backend_tokenizer.to_str()`."""
    from tokenizers import Tokenizer

    return _wrap(Tokenizer.from_str(text))


def _wrap(backend):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", cls_token="<s>", pad_token="<pad>",
        eos_token="</s>", sep_token="</s>", unk_token="<unk>", mask_token="<mask>",
        model_max_length=128,
    )


def builtin_text_task(tokenizer: Any, max_length: int) -> Task:
    """Which of six stdlib packages a docstring comes from: ~1,200 examples, 60/20/20."""
    _need_tokenizer(tokenizer, "builtin:text")
    splits = builtin_splits()  # stdlib docstrings: they change with the Python release
    return _task("builtin:text", splits, list(BUILTIN_PACKAGES), tokenizer, max_length,
                 fingerprint_of(json.dumps(splits, sort_keys=True).encode()))


# ---- jsonl:DIR ------------------------------------------------------------------------------

def _read_jsonl(path: Path, source: str) -> list[tuple[str, Any, int]]:
    """(text, label, line number) per non-blank line; ConfigError names the file and line."""
    if not path.is_file():
        raise ConfigError(f"data {source!r}: missing file {path}")
    rows = []
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            where = f"data {source!r}: {path} line {number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ConfigError(f"{where}: not UTF-8 (byte {err.start})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{where}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict) or "text" not in row or "label" not in row:
                raise ConfigError(f"{where}: needs an object with 'text' and 'label'")
            text, label = row["text"], row["label"]
            if not isinstance(text, str):
                raise ConfigError(f"{where}: 'text' must be a string")
            if isinstance(label, bool) or not isinstance(label, (str, int)):
                raise ConfigError(f"{where}: 'label' must be a string or an integer")
            rows.append((text, label, number))
    if not rows:
        raise ConfigError(f"data {source!r}: {path} has no examples")
    return rows


def _jsonl_splits(path: Path, source: str) -> tuple[dict[str, tuple[list[str], list[int]]], list]:
    """Every split's texts and class indices, and the classes (train's labels, sorted)."""
    files = {"train": path / "train.jsonl", "val": path / "dev.jsonl", "test": path / "test.jsonl"}
    rows = {split: _read_jsonl(file, source) for split, file in files.items()}
    # Sorted labels -> 0..C-1; ints sort before strings so mixed files still sort.
    classes = sorted({label for _, label, _ in rows["train"]}, key=lambda v: (isinstance(v, str), v))
    index = {label: i for i, label in enumerate(classes)}
    splits = {}
    for split, split_rows in rows.items():
        for _, label, number in split_rows:
            if label not in index:
                raise ConfigError(f"data {source!r}: {files[split]} line {number}: label {label!r} "
                                  "does not occur in train.jsonl")
        splits[split] = ([t for t, _, _ in split_rows], [index[y] for _, y, _ in split_rows])
    return splits, classes


def scan_jsonl(path: Path, source: str) -> tuple[int, int]:
    """(training examples, classes), after checking every line of every file."""
    splits, classes = _jsonl_splits(Path(path), source)
    return len(splits["train"][0]), len(classes)


def jsonl_task(path: Path, tokenizer: Any, max_length: int, source: str) -> Task:
    """DIR/train.jsonl, dev.jsonl, test.jsonl; one {"text", "label"} object per line."""
    _need_tokenizer(tokenizer, source)
    splits, classes = _jsonl_splits(Path(path), source)
    return _task(source, splits, classes, tokenizer, max_length, fingerprint_dir(Path(path)))


# ---- hfdisk:DIR -----------------------------------------------------------------------------

def hfdisk_task(path: Path, tokenizer: Any, max_length: int, source: str) -> Task:
    """A DatasetDict saved with save_to_disk: train, validation (or dev), test; text + label."""
    _need_tokenizer(tokenizer, source)
    try:
        from datasets import DatasetDict, load_from_disk
    except ImportError:
        raise ConfigError(f"data {source!r}: needs the `datasets` package "
                          "(pip install datasets)") from None
    try:
        saved = load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"data {source!r}: not a dataset saved with save_to_disk ({err})") from None
    if not isinstance(saved, DatasetDict):
        raise ConfigError(f"data {source!r}: {path} holds one split; save a DatasetDict with "
                          "train, validation and test")
    names = {"train": ("train",), "val": ("validation", "dev"), "test": ("test",)}
    parts = {}
    for split, options in names.items():
        found = [n for n in options if n in saved]
        if not found:
            raise ConfigError(f"data {source!r}: no {' or '.join(options)} split in {path}")
        part = saved[found[0]]
        for column in ("text", "label"):
            if column not in part.column_names:
                raise ConfigError(f"data {source!r}: split {found[0]} has no {column!r} column "
                                  f"(columns: {', '.join(part.column_names)})")
        parts[split] = (found[0], list(part["text"]), list(part["label"]))
    # A ClassLabel column is already 0..C-1 with known C; anything else is mapped like jsonl.
    feature = saved[parts["train"][0]].features["label"]
    names = getattr(feature, "names", None)  # a ClassLabel's names, by index
    if hasattr(feature, "num_classes"):
        classes = list(range(feature.num_classes))
    else:
        classes = sorted(set(parts["train"][2]), key=lambda v: (isinstance(v, str), v))
    index = {label: i for i, label in enumerate(classes)}
    splits = {}
    for split, (name, texts, labels) in parts.items():
        unknown = [y for y in labels if y not in index]
        if unknown:
            raise ConfigError(f"data {source!r}: split {name} has label {unknown[0]!r}, unseen in train")
        splits[split] = (texts, [index[y] for y in labels])
    return _task(source, splits, names or classes, tokenizer, max_length, fingerprint_dir(Path(path)))
