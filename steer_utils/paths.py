"""Every path the artifact reads or writes, defined once.

Outputs (results, figures) and the cache can be redirected with environment
variables, so tests and notebook checks never overwrite the committed outputs.
"""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = ROOT / "data"
CONCEPTS_DIR = DATA_DIR / "concepts"
STATEMENTS_FILE = DATA_DIR / "statements.txt"
QUESTIONS_FILE = DATA_DIR / "questions.yaml"
NOTEBOOKS_DIR = ROOT / "notebooks"

RESULTS_DIR = Path(os.environ.get("STEER_RESULTS_DIR", ROOT / "results"))
FIGURES_DIR = Path(os.environ.get("STEER_FIGURES_DIR", ROOT / "figures"))
# Safe to delete at any time: everything in it is recomputed on demand.
CACHE_DIR = Path(os.environ.get("STEER_CACHE_DIR", ROOT / "cache"))


def model_slug(model: str) -> str:
    """A folder name for a model name, HF id or local path ("meta-llama/X" -> "meta-llama--X")."""
    return model.strip().rstrip("/").replace("\\", "/").replace("/", "--").lstrip(".-") or "model"


def results_dir(model: str) -> Path:
    """`results/<model>/`, created if missing."""
    path = RESULTS_DIR / model_slug(model)
    path.mkdir(parents=True, exist_ok=True)
    return path


def figures_dir(model: str) -> Path:
    """`figures/<model>/`, created if missing."""
    path = FIGURES_DIR / model_slug(model)
    path.mkdir(parents=True, exist_ok=True)
    return path
