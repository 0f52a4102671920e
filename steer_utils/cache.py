"""On-disk cache of tensors and tables, keyed by what produced them, written atomically (temp file + rename).

A key hashes the stage name, the stage's code version and its inputs, so a changed input or
a bumped version never reuses a stale entry. Deleting `cache/` is always safe.

Writers go through `atomic_write`: the data goes to a temporary file whose name starts with '.', beside the
target, and is renamed into place when complete. A finished entry never starts with '.'; a killed run leaves at
most such temporary files, which are never read (`python -m steer_utils.cache info` counts them, `clean-tmp`
removes them). Results tables are written the same way (`write_csv`).

Command line (also `make cache-info` / `make clean-cache`):
    python -m steer_utils.cache info        # files and size per stage, and the total
    python -m steer_utils.cache clean-tmp   # remove temporary files left by killed runs (none may be running)
    python -m steer_utils.cache clean       # remove the whole cache; never results/ or figures/
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from . import paths

if TYPE_CHECKING:  # torch and pandas are imported where used, so the command line starts fast
    import pandas as pd
    import torch

_UMASK = os.umask(0o022)
os.umask(_UMASK)
# Stages whose entries sit in one folder per model (cache/<stage>/<model>/).
PER_MODEL_STAGES = ("generations", "layers", "baselines", "sadi", "study")  # see `entry_path`


def cache_dir() -> Path:
    """The cache folder, `STEER_CACHE_DIR` or ./cache (`paths.CACHE_DIR`), read at call time: tests patch one name."""
    return Path(paths.CACHE_DIR)


def entry_path(stage: str, key: str, suffix: str = "", model: str | None = None) -> Path:
    """Where a cache entry lives: `cache/<stage>/<key><suffix>`, or `cache/<stage>/<model>/<key><suffix>` for the
    stages kept per model (PER_MODEL_STAGES; `model` is a model name, made a folder name by `paths.model_slug`)."""
    if (model is not None) != (stage in PER_MODEL_STAGES):
        raise ValueError(f"Cache stage {stage!r} {'needs' if stage in PER_MODEL_STAGES else 'takes no'} model name.")
    folder = cache_dir() / stage
    return (folder / paths.model_slug(model) if model is not None else folder) / f"{key}{suffix}"


def cache_key(stage: str, version: int, **inputs) -> str:
    """A stable hex key for `stage` at code `version` with JSON-serialisable `inputs`."""
    raw = json.dumps({"stage": stage, "version": version, **inputs}, sort_keys=True, default=str)
    return hashlib.sha256(raw.encode()).hexdigest()[:20]


def upstream_versions(current: dict[str, int], written_with: dict[str, int]) -> dict:
    """Key inputs for the code versions of the stages a stage builds on.

    Empty while `current` equals `written_with` (the versions the existing entries were made with, so their keys
    stay valid); `{"upstream": current}` once any of them is bumped, so a bump never reuses an entry made with
    the old code.
    """
    return {} if current == written_with else {"upstream": dict(sorted(current.items()))}


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
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_csv(frame: "pd.DataFrame", path: Path) -> Path:
    """Write a table as CSV (no index) atomically; returns the path."""
    atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))
    return Path(path)


def save_tensors(path: Path, tensors: dict[str, "torch.Tensor"], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically."""
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata))


def cached_tensors(
    stage: str, key: str, compute: Callable[[], dict[str, "torch.Tensor"]], model: str | None = None
) -> dict[str, "torch.Tensor"]:
    """Load the entry `entry_path(stage, key, ".safetensors", model)`, or compute, save and return it."""
    from safetensors.torch import load_file

    path = entry_path(stage, key, ".safetensors", model)
    if path.exists():
        return load_file(path)
    tensors = compute()
    save_tensors(path, tensors)
    return tensors


# --- Disk use and cleaning ----------------------------------------------------------------------------------------
def _is_temporary(path: Path, root: Path) -> bool:
    """A temporary file of `atomic_write` or of a model conversion: its name or a folder on its path starts with '.'."""
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _stage(path: Path, root: Path) -> str:
    parts = path.relative_to(root).parts
    if len(parts) == 1:
        return "(top level)"
    if parts[0] in PER_MODEL_STAGES and len(parts) > 2:
        return f"{parts[0]}/{parts[1]}"
    return parts[0]


def cache_info(cache_dir: Path | None = None) -> list[dict]:
    """One row per stage of the cache (`models`, `activations`, `generations/<model>`, ..., `test-outputs`):
    {"stage", "files", "bytes", "temporary"} sorted by stage, where `files`/`bytes` count finished entries and
    `temporary` the temporary files killed runs left behind. Empty when the cache does not exist."""
    root = Path(cache_dir if cache_dir is not None else paths.CACHE_DIR)
    rows: dict[str, dict] = {}
    if not root.is_dir():
        return []
    for folder, _, files in os.walk(root):
        for name in files:
            path = Path(folder) / name
            try:
                size = path.lstat().st_size
            except OSError:  # removed while we walk (a concurrent run renamed its temporary file)
                continue
            row = rows.setdefault(
                _stage(path, root), {"stage": _stage(path, root), "files": 0, "bytes": 0, "temporary": 0}
            )
            if _is_temporary(path, root):
                row["temporary"] += 1
            else:
                row["files"] += 1
                row["bytes"] += size
    return [rows[k] for k in sorted(rows)]


def human_size(n: int) -> str:
    """Bytes as a short human-readable size ('512 B', '3.2 MiB')."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError


def format_info(rows: list[dict], cache_dir: Path | None = None) -> str:
    """The table `python -m steer_utils.cache info` prints."""
    root = Path(cache_dir if cache_dir is not None else paths.CACHE_DIR)
    if not rows:
        return f"No cache at {root}."
    width = max(len("total"), *(len(r["stage"]) for r in rows))
    lines = [f"Cache {root}", f"{'stage':<{width}}  {'files':>7}  {'size':>10}  {'temporary':>9}"]
    for r in rows + [
        {
            "stage": "total",
            "files": sum(r["files"] for r in rows),
            "bytes": sum(r["bytes"] for r in rows),
            "temporary": sum(r["temporary"] for r in rows),
        }
    ]:
        if r["stage"] == "total":
            lines.append("-" * len(lines[1]))
        lines.append(f"{r['stage']:<{width}}  {r['files']:>7}  {human_size(r['bytes']):>10}  {r['temporary']:>9}")
    if any(r["temporary"] for r in rows):
        lines.append(
            "temporary: files left by interrupted runs, never read; "
            "`python -m steer_utils.cache clean-tmp` removes them."
        )
    return "\n".join(lines)


def _check_removable(root: Path) -> Path:
    """`root` resolved, or a ValueError when deleting it would delete the project, results or figures."""
    root = root.resolve()
    protected = {
        paths.ROOT,
        paths.ROOT / "results",
        paths.ROOT / "figures",
        paths.DATA_DIR,
        paths.NOTEBOOKS_DIR,
        Path(paths.RESULTS_DIR),
        Path(paths.FIGURES_DIR),
        Path.home(),
    }
    for path in protected:
        path = path.resolve()
        if path == root or root in path.parents:
            raise ValueError(
                f"Refusing to delete the cache at {root}: it contains {path}. Point STEER_CACHE_DIR at "
                "a folder of its own (results/ and figures/ are never removed)."
            )
    return root


def clean(cache_dir: Path | None = None, temporary_only: bool = False) -> int:
    """Delete the cache folder (or only the temporary files of killed runs); returns the bytes freed.

    Never touches results/ or figures/: it refuses a cache folder that contains them (or the project)."""
    root = Path(cache_dir if cache_dir is not None else paths.CACHE_DIR)
    if not root.exists():
        return 0
    root = _check_removable(root)
    freed = 0
    for folder, dirs, files in os.walk(root, topdown=True):
        for name in files:
            path = Path(folder) / name
            if not temporary_only or _is_temporary(path, root):
                freed += path.lstat().st_size
                if temporary_only:
                    path.unlink(missing_ok=True)
    if temporary_only:
        for folder, dirs, _ in os.walk(root, topdown=False):
            for name in dirs:
                path = Path(folder) / name
                if _is_temporary(path, root):
                    shutil.rmtree(path, ignore_errors=True)
    else:
        shutil.rmtree(root)
    return freed


def main(argv: list[str] | None = None) -> int:
    """Command line: python -m steer_utils.cache {info,clean-tmp,clean} [--cache-dir DIR]."""
    parser = argparse.ArgumentParser(prog="python -m steer_utils.cache", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["info", "clean-tmp", "clean"])
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: STEER_CACHE_DIR or ./cache")
    args = parser.parse_args(argv)
    root = args.cache_dir if args.cache_dir is not None else cache_dir()
    if args.command == "info":
        print(format_info(cache_info(root), root))
        return 0
    try:
        freed = clean(root, temporary_only=args.command == "clean-tmp")
    except ValueError as error:
        print(error, file=sys.stderr)
        return 1
    what = "temporary files in" if args.command == "clean-tmp" else "the cache at"
    print(f"Removed {what} {Path(root).resolve()} ({human_size(freed)}); results/ and figures/ are untouched.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
