"""Where raysd keeps what it builds once per machine: demo weights, tokenizers, decoded images.

A leaf module (imports nothing of raysd), so every layer can find the cache without cycles."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$RAYSD_CACHE, else ~/.cache/raysd."""
    return Path(os.environ.get("RAYSD_CACHE", Path.home() / ".cache" / "raysd")).expanduser()
