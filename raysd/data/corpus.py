"""The text demo's general-domain corpus: docstrings of the Python standard library.

It ships with every Python, so `builtin:demo` for roberta_tiny needs no download. Modules are
read with `ast`, never imported (importing all of the stdlib runs code: `antigravity` opens a
browser). The six packages that builtin:text classifies, their tests, and any docstring that is
also a builtin:text example are left out, so pre-training never sees the target task's text.
One module in HELD_OUT (by a hash of its path) is held out of pre-training: text to measure
the demo on that it never saw.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import os
import sys
import sysconfig
import zlib
from pathlib import Path
from typing import Any

import torch

from raysd.data.text import BUILTIN_PACKAGES, MIN_WORDS, TokenizedText, builtin_corpus

# Not the standard library (site-packages sits inside it on some installs), or test suites
# (the stdlib's own tests cover the six packages too).
SKIPPED_DIRS = ("site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__")
HELD_OUT = 20  # one module in 20 never enters pre-training
DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _source_files() -> list[Path]:
    """Every stdlib .py file outside SKIPPED_DIRS, sorted (the six packages included: their
    text is what the corpus must not contain)."""
    found = []
    for folder, dirs, files in os.walk(stdlib_root()):
        dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS]  # never walked into
        found += [Path(folder) / f for f in files if f.endswith(".py")]
    return sorted(found)


def _in_target(path: Path) -> bool:
    return path.relative_to(stdlib_root()).parts[0].removesuffix(".py") in BUILTIN_PACKAGES


def _held_out(path: Path) -> bool:
    return zlib.crc32(path.relative_to(stdlib_root()).as_posix().encode()) % HELD_OUT == 0


def _docstrings(path: Path) -> list[str]:
    """Docstrings of a module and of every class and function in it, whitespace-normalised as
    builtin:text normalises its examples."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError):  # lib2to3's Python 2 test data and the like
        return []
    docs = (ast.get_docstring(node, clean=False) for node in ast.walk(tree) if isinstance(node, DOCUMENTED))
    return [" ".join(d.split()) for d in docs if d and len(d.split()) >= MIN_WORDS]


@functools.lru_cache(maxsize=1)
def demo_corpus() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(pre-training texts, held-out texts): each docstring once, none of builtin:text's."""
    target = set(builtin_corpus()[0])
    seen: set[str] = set()
    parts: tuple[list[str], list[str]] = ([], [])
    for path in _source_files():
        if _in_target(path):
            continue
        for text in _docstrings(path):
            if text not in target and text not in seen:
                seen.add(text)
                parts[_held_out(path)].append(text)
    return tuple(parts[0]), tuple(parts[1])


def corpus_fingerprint() -> str:
    """What the corpus is made of without reading it: the Python version and every source
    file's path, size and modification time (the six packages' too: they decide what is left
    out). A new Python or an edited stdlib gives new demo weights."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{sys.version}|{HELD_OUT}|{MIN_WORDS}|{SKIPPED_DIRS}|{BUILTIN_PACKAGES}\n".encode())
    root = stdlib_root()
    for path in _source_files():
        stat = path.stat()
        h.update(f"{path.relative_to(root)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()


def packed(texts: tuple[str, ...] | list[str], tokenizer: Any, max_length: int) -> TokenizedText:
    """The texts as rows of max_length tokens, RoBERTa's way (FULL-SENTENCES): each text is
    <s> ... </s> (a long one cut into several), and consecutive ones share a row while they
    fit, so few positions are padding. Labels are 0 (unused)."""
    pieces = tokenizer(list(texts), truncation=True, max_length=max_length,
                       return_overflowing_tokens=True)["input_ids"]
    rows: list[list[int]] = [[]]
    for ids in pieces:
        if len(rows[-1]) + len(ids) > max_length:
            rows.append([])
        rows[-1] += ids
    ids = torch.full((len(rows), max_length), tokenizer.pad_token_id, dtype=torch.long)  # [N, L]
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
    mask = (ids != tokenizer.pad_token_id).long()
    return TokenizedText(ids, mask, torch.zeros(len(rows), dtype=torch.long))
