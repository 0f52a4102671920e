"""Every path the artifact reads or writes, defined once.

Outputs (results, figures) and the cache can be redirected with environment
variables, so tests and notebook checks never overwrite the committed outputs.
"""

from __future__ import annotations

import numbers
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = ROOT / "data"
CONCEPTS_DIR = DATA_DIR / "concepts"
STATEMENTS_FILE = DATA_DIR / "statements.txt"
QUESTIONS_FILE = DATA_DIR / "questions.yaml"
JUDGE_CASES_FILE = DATA_DIR / "judge_cases.jsonl"  # hand-labelled responses: the judge's validation set
JUDGE_CALIBRATION_FILE = DATA_DIR / "judge_calibration.json"  # the LLM judge's verdict rule, chosen on dev halves
NOTEBOOKS_DIR = ROOT / "notebooks"

RESULTS_DIR = Path(os.environ.get("STEER_RESULTS_DIR", ROOT / "results"))
FIGURES_DIR = Path(os.environ.get("STEER_FIGURES_DIR", ROOT / "figures"))
# Safe to delete at any time: everything in it is recomputed on demand.
CACHE_DIR = Path(os.environ.get("STEER_CACHE_DIR", ROOT / "cache"))


# Every results table, by the notebook that writes it: results/<model>/[<variant>/]<name> (04's: results/<name>).
# The notebooks, `tools.report`, `experiments.scaling` and `tools.inputs` name tables from here (a test checks it).
TABLES: dict[str, tuple[str, ...]] = {
    "00_data_prep": ("data_summary.csv",),
    "01_token_selection": (
        "01_generations.csv", "01_fits.csv", "01_steerability.csv", "01_steerability_per_question.csv",
        "01_paired_tests.csv", "01_examples.csv", "01_strip.csv",
    ),
    "02_soft_vs_hard_labels": (
        "02_generations.csv", "02_steerability_labels.csv", "02_paired_tests.csv", "02_statement_sweep.csv",
        "02_methods.csv", "02_eps_sweep.csv",
    ),
    "03_layer_enrichment": (
        "03_enrichment.csv", "03_enrichment_by_class.csv", "03_top_blocks.csv", "03_generations.csv",
        "03_steerability.csv", "03_paired_tests.csv",
    ),
    "04_multi_model_scaling": (
        "04_models.csv", "04_scaling_curve.csv", "04_comparisons.csv", "04_prior_vs_ours.csv",
        "04_soft_label_gain.csv", "04_enrichment_depth.csv", "04_working_eps.csv", "04_person_checked.csv",
    ),
    "05_baselines": (
        "05_sadi_tuning.csv", "05_generations.csv", "05_steerability.csv", "05_paired_tests.csv", "05_costs.csv",
    ),
    "06_steering_protocol": (
        "06_separation.csv", "06_concept_logprob.csv", "06_generations.csv", "06_prompting.csv", "06_factors.csv",
        "06_grid.csv", "06_response_profile.csv", "06_choice.csv", "06_bound.csv", "06_confirmed.csv", "06_strip.csv",
    ),
    "07_working_window": (
        "07_block_norms.csv", "07_generations.csv", "07_responses.csv", "07_window.csv", "07_strip.csv",
    ),
}  # fmt: skip
DURATIONS = "durations.csv"  # per results folder: how long each notebook's last `make` run took, and on what CPU


def producer(table: str) -> str:
    """The notebook that writes a results table (`TABLES`), e.g. '01_steerability.csv' -> '01_token_selection'."""
    for notebook, names in TABLES.items():
        if table in names:
            return notebook
    raise KeyError(f"'{table}' is not a results table; the known ones are listed in paths.TABLES.")


def model_slug(model: str) -> str:
    """A folder name for a model name, HF id or local path ("meta-llama/X" -> "meta-llama--X")."""
    return model.strip().rstrip("/").replace("\\", "/").replace("/", "--").lstrip(".-") or "model"


def check_shard(shard_index: int, num_shards: int) -> tuple[int, int]:
    """`(shard_index, num_shards)` as ints, or a ValueError saying which papermill parameter to fix."""
    for name, value in (("num_shards", num_shards), ("shard_index", shard_index)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(
                f"Parameter {name} must be an integer, got {value!r} ({type(value).__name__}); "
                f"pass it as e.g. `-p {name} 2` (make: SHARD_INDEX=2 NUM_SHARDS=4)."
            )
    shard_index, num_shards = int(shard_index), int(num_shards)
    if num_shards < 1:
        raise ValueError(f"Parameter num_shards must be at least 1, got {num_shards}; use 1 for an unsharded run.")
    if not 0 <= shard_index < num_shards:
        raise ValueError(
            f"Parameter shard_index must be in 0..{num_shards - 1} for num_shards={num_shards}, "
            f"got {shard_index}; shards are numbered from 0."
        )
    return shard_index, num_shards


def shard_name(shard_index: int, num_shards: int) -> str:
    """The folder name of one shard, e.g. '2-of-4' (shards are numbered from 0)."""
    shard_index, num_shards = check_shard(shard_index, num_shards)
    return f"{shard_index}-of-{num_shards}"


def _output_dir(root: Path, model: str, shard_index: int, num_shards: int, variant: str = "") -> Path:
    path = root / model_slug(model) / variant
    if check_shard(shard_index, num_shards)[1] > 1:
        path = path / "shards" / shard_name(shard_index, num_shards)
    path.mkdir(parents=True, exist_ok=True)
    return path


def results_dir(model: str, shard_index: int = 0, num_shards: int = 1, variant: str = "") -> Path:
    """`results/<model>/` (or `results/<model>/shards/<i>-of-<n>/` for a sharded run), created if missing; a
    `variant` (e.g. 'protocol-paper', a run off the adopted protocol) is a subfolder: `results/<model>/<variant>/`."""
    return _output_dir(RESULTS_DIR, model, shard_index, num_shards, variant)


def figures_dir(model: str, shard_index: int = 0, num_shards: int = 1, variant: str = "") -> Path:
    """`figures/<model>/` (or `figures/<model>/shards/<i>-of-<n>/` for a sharded run), created if missing; a
    `variant` is a subfolder, as for `results_dir`."""
    return _output_dir(FIGURES_DIR, model, shard_index, num_shards, variant)
