"""On-disk cache of tensors, keyed by what produced them, written atomically (temp file + rename).

A key hashes the stage name, the stage's code version and its inputs, so a changed input or
a bumped version never reuses a stale entry. Deleting `cache/` is always safe.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from .paths import CACHE_DIR


def cache_key(stage: str, version: int, **inputs) -> str:
    """A stable hex key for `stage` at code `version` with JSON-serialisable `inputs`."""
    raw = json.dumps({"stage": stage, "version": version, **inputs}, sort_keys=True, default=str)
    return hashlib.sha256(raw.encode()).hexdigest()[:20]


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` on a temporary file beside `path`, then rename it into place.

    A reader (or a rerun after a crash) sees the old file, the new one, or none; never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically."""
    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata))


def cached_tensors(stage: str, key: str, compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Load `cache/<stage>/<key>.safetensors`, or compute, save and return it."""
    path = CACHE_DIR / stage / f"{key}.safetensors"
    if path.exists():
        return load_file(path)
    tensors = compute()
    save_tensors(path, tensors)
    return tensors
