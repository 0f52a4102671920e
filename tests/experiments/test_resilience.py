"""Resumable, deterministic runs.

- Cache keys: every input of a concept's generations (and the code versions of the stages they build on) changes
  the key; an unchanged rerun computes nothing and writes nothing.
- Notebook 01 on the tiny model (papermill, smoke profile): a run killed mid-way (Ctrl-C = SIGINT to papermill's
  process group, or SIGKILL of papermill and its kernel) leaves only complete cache entries (temporary files
  start with '.'), and rerunning it continues from them and ends with byte-identical results and figures to an
  uninterrupted run. Each run starts from its own empty cache, so the comparison is also the determinism check:
  two from-scratch runs give byte-identical results CSVs on CPU (notebook 01 writes no timings or timestamps).

The notebook runs with a stand-in judge (a hash of concept and response; the real one loads all-MiniLM-L6-v2,
which the default test run does not), installed by an IPython startup file of the test's own IPYTHONDIR;
STEER_TEST_REAL_JUDGE=1 keeps the real judge.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from steer_utils import cache, paths
from steer_utils.core import extraction, training
from steer_utils.core.protocol import PAPER
from steer_utils.experiments import data, pipeline
from steer_utils.paths import NOTEBOOKS_DIR, ROOT

NOTEBOOK = NOTEBOOKS_DIR / "01_token_selection.ipynb"
PARAMETERS = ["-p", "profile", "smoke", "-p", "n_concepts_per_class", "2"]  # 10 concepts x 3 settings
N_CONCEPTS, N_SETTINGS, N_QUESTIONS = 10, 3, 4
STAND_IN_JUDGE = """
import hashlib, os
from pathlib import Path

import steer_utils
Path(os.environ["STEER_TEST_IMPORTED"]).write_text(steer_utils.__file__)  # which package the kernel runs
if os.environ.get("STEER_TEST_REAL_JUDGE") != "1":
    import pandas as pd
    from steer_utils.experiments import judge

    class StandInJudge:
        def score_table(self, concept_class, concepts, questions, responses):
            concepts, questions, responses = judge._check_rows(concept_class, concepts, questions, responses)
            score = [hashlib.sha256(f"{c}|{r}".encode()).digest()[0] % 2 for c, r in zip(concepts, responses)]
            return pd.DataFrame({"concept": concepts, "response": responses, "reason": "stand-in", "score": score})

    judge.load_judge = lambda name="embedding", **kwargs: StandInJudge()
if os.environ.get("STEER_TEST_SLOW_CONCEPTS"):  # a pause after each concept, so a kill always lands mid-run
    import time
    from steer_utils.experiments import pipeline

    run_concept = pipeline.run_concept

    def slow_run_concept(*args, **kwargs):
        out = run_concept(*args, **kwargs)
        time.sleep(float(os.environ["STEER_TEST_SLOW_CONCEPTS"]))
        return out

    pipeline.run_concept = slow_run_concept
"""


# --- Cache keys and an in-process rerun -------------------------------------------------------------------------
def _entries(folder: Path) -> dict[str, tuple[int, int]]:
    """Finished cache entries: relative path -> (inode, mtime) (a rewritten file changes both)."""
    return {
        str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    }


def test_generation_keys_cover_every_input_and_upstream_code_version(tiny, monkeypatch):
    model, _, _ = tiny
    settings = [training.Setting.parse("attention-soft-rfm")]
    base = dict(
        model=model,
        model_name="tiny",
        concept_class="moods",
        concept="Cheerful",
        statements=["a.", "b."],
        questions=["Why?"],
        settings=settings,
        coefficients=(0.02,),
        blocks=[1],
        max_new_tokens=5,
        seed=0,
        protocol=PAPER,
        stop_loops=False,
    )

    def generation_keys(
        model,
        model_name,
        concept_class,
        concept,
        statements,
        questions,
        settings,
        coefficients,
        blocks,
        max_new_tokens,
        seed,
        protocol,
        stop_loops,
    ):
        context = pipeline.RunContext(
            model, None, model_name, statements, {concept_class: questions}, max_new_tokens, seed, stop_loops=stop_loops
        )
        return pipeline.generation_keys(context, concept_class, concept, settings, coefficients, blocks, protocol)

    key = generation_keys(**base)["attention-soft-rfm"]
    # The inputs the first cache entries were written with, plus the code versions once they moved on (decoding every
    # token is what the decoder did before loop stopping, so it adds nothing).
    old_inputs = dict(
        model="tiny",
        dtype="torch.float32",
        concept=["moods", "Cheerful"],
        statements=hashlib.sha256(b"a.\nb.").hexdigest(),
        questions=["Why?"],
        coefficients=[0.02],
        max_new_tokens=5,
        seed=0,
        blocks=[1],
    )
    upstream = {"extraction": extraction.EXTRACTION_VERSION, "pipeline": pipeline.PIPELINE_VERSION}
    expected = cache.cache_key(
        "generations", pipeline.PIPELINE_VERSION, setting="attention-soft-rfm", **old_inputs, upstream=upstream
    )
    assert key == expected
    changes = dict(
        model_name="other",
        concept_class="fears",
        concept="Heights",
        statements=["a."],
        questions=["Why not?"],
        settings=[training.Setting.parse("fixed-soft-rfm")],
        coefficients=(0.03,),
        blocks=[0, 1],
        max_new_tokens=6,
        seed=1,
        model=torch.nn.Linear(2, 2).to(torch.bfloat16),
        stop_loops=True,
    )
    keys = {name: next(iter(generation_keys(**(base | {name: value})).values())) for name, value in changes.items()}
    for name, version in (("EXTRACTION_VERSION", extraction), ("PIPELINE_VERSION", pipeline)):
        with monkeypatch.context() as patch:
            patch.setattr(version, name, getattr(version, name) + 1)
            keys[name] = generation_keys(**base)["attention-soft-rfm"]
    assert len(set(keys.values()) | {key}) == len(keys) + 1, keys  # every change: a key of its own


def test_unchanged_rerun_computes_nothing_and_changed_inputs_get_new_entries(tiny, tmp_path, monkeypatch):
    model, tokenizer, _ = tiny
    monkeypatch.setattr(paths, "CACHE_DIR", tmp_path)
    settings = [training.Setting.parse(s) for s in ("fixed-hard-rfm", "attention-soft-rfm")]
    statements = data.load_statements(n=6)

    def run(n: int):
        context = pipeline.RunContext(model, tokenizer, "tiny", statements[:n], {"moods": ["Why?", "Hi."]}, 4)
        return pipeline.run_concept(context, "moods", "Cheerful", settings, (0.0, 0.02), protocol=PAPER)

    first = run(6)
    before = _entries(tmp_path)
    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "concept_activations", lambda *a, **k: pytest.fail("recomputed activations"))
        patch.setattr(pipeline, "generate_grid", lambda *a, **k: pytest.fail("regenerated"))
        again = run(6)
    pd.testing.assert_frame_equal(again[0], first[0])
    assert _entries(tmp_path) == before  # nothing written, nothing rewritten
    run(5)  # one statement fewer: new activations and generations, the old entries untouched
    after = _entries(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before
    new = [k for k in after if k not in before]
    assert sum(k.startswith("generations/") and k.count(".") == 1 for k in new) == len(settings)
    assert sum(k.startswith("activations/") for k in new) == 2  # prefixed and unprefixed prompt sets


# --- Notebook 01: kill, resume, compare ---------------------------------------------------------------------------
def _has_kernel() -> bool:
    try:
        from jupyter_client.kernelspec import KernelSpecManager

        return "steer-utils" in KernelSpecManager().find_kernel_specs()
    except ImportError:
        return False


needs_kernel = pytest.mark.skipif(not _has_kernel(), reason="the steer-utils kernel is not installed (make install)")


@pytest.fixture(scope="module")
def ipython_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ipython")
    startup = folder / "profile_default" / "startup"
    startup.mkdir(parents=True)
    (startup / "00-stand-in-judge.py").write_text(STAND_IN_JUDGE)
    return folder


def _start(folder: Path, model_dir: Path, ipython_dir: Path, pause: float = 0.0) -> subprocess.Popen:
    """Notebook 01 under papermill in its own process group, with cache, results and figures under `folder`
    (`pause` seconds after each concept: results are unchanged, but a kill cannot come too late on a busy machine)."""
    folder.mkdir(parents=True, exist_ok=True)
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        STEER_TEST_SLOW_CONCEPTS=str(pause) if pause else "",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        IPYTHONDIR=str(ipython_dir),
        STEER_TEST_IMPORTED=str(folder / "imported.txt"),
        STEER_CACHE_DIR=str(folder / "cache"),
        STEER_RESULTS_DIR=str(folder / "results"),
        STEER_FIGURES_DIR=str(folder / "figures"),
    )
    command = [
        sys.executable,
        "-m",
        "papermill",
        "--kernel",
        "steer-utils",
        "--cwd",
        str(NOTEBOOKS_DIR),
        "--no-progress-bar",
        str(NOTEBOOK),
        str(folder / "01.ipynb"),
        "-p",
        "model",
        str(model_dir),
        *PARAMETERS,
    ]
    log = open(folder / "papermill.log", "a")
    return subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _finish(process: subprocess.Popen, folder: Path) -> None:
    assert process.wait(timeout=240) == 0, (folder / "papermill.log").read_text()[-3000:]
    assert Path((folder / "imported.txt").read_text()) == ROOT / "steer_utils" / "__init__.py"  # this checkout's


def _generations(folder: Path) -> list[Path]:
    """Finished generation entries (`<key>.csv`, written last for each concept and setting)."""
    root = folder / "cache" / "generations"
    if not root.exists():
        return []
    return [p for p in root.rglob("*.csv") if p.name.count(".") == 1 and not p.name.startswith(".")]


def _kill(process: subprocess.Popen, how: signal.Signals) -> None:
    """Ctrl-C (SIGINT to papermill's process group and to its kernel, which runs in a session of its own, so the
    running cell stops with KeyboardInterrupt at once rather than whenever papermill shuts the kernel down), or
    SIGKILL of papermill and its kernel at once."""
    import psutil

    children = psutil.Process(process.pid).children(recursive=True)
    for child in children:
        child.send_signal(how)
    os.killpg(process.pid, how)
    process.wait(timeout=60)
    _, alive = psutil.wait_procs(children, timeout=30)
    for child in alive:
        child.kill()
    assert not alive, f"the kernel outlived papermill after {how.name}"


def _check_complete(folder: Path) -> None:
    """Every finished cache entry is whole (tables parse with all their rows, tensors load); a generations entry is
    written after its fit table and vector; anything else is a temporary file, whose name starts with '.'."""
    root = folder / "cache"
    for rel in _entries(root):
        path = root / rel
        if path.suffix == ".safetensors":
            load_file(path)
        elif path.suffix == ".csv":
            table = pd.read_csv(path, keep_default_na=False)
            if path in _generations(folder):
                assert len(table) == len(pipeline.COEFFICIENTS) * N_QUESTIONS, rel
                assert path.with_suffix(".fits.csv").is_file() and path.with_suffix(".vector.safetensors").is_file()
        else:
            pytest.fail(f"unexpected cache file {rel}")


def _same_files(a: Path, b: Path, finished_only: bool = False) -> None:
    files_a, files_b = ([str(p.relative_to(f)) for p in f.rglob("*") if p.is_file()] for f in (a, b))
    if finished_only:  # a SIGKILL may leave temporary files behind, never read
        files_a, files_b = sorted(_entries(a)), sorted(_entries(b))
    assert sorted(files_a) == sorted(files_b)
    differ = [f for f in files_a if _content(a / f) != _content(b / f)]
    assert not differ, f"differ from the uninterrupted run: {differ}"


def _content(path: Path):
    """The bytes of a file; for safetensors its tensors and metadata (the header lists the metadata in a random
    order, so equal files need not be byte-identical)."""
    if path.suffix != ".safetensors":
        return path.read_bytes()
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata(), {k: handle.get_tensor(k).numpy().tobytes() for k in sorted(handle.keys())}


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, ipython_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("run-a")
    _finish(_start(folder, tiny_model_dir, ipython_dir), folder)
    assert len(_generations(folder)) == N_CONCEPTS * N_SETTINGS
    written = {p.name for p in (folder / "results").rglob("*")} | {p.name for p in (folder / "figures").rglob("*")}
    assert {
        "01_generations.csv",
        "01_fits.csv",
        "01_steerability.csv",
        "01_steerability_per_question.csv",
        "01_paired_tests.csv",
        "01_examples.csv",
        "versions.csv",
        "fig01_steerability_by_token.png",
        "fig01_selected_tokens.pdf",
    } <= written
    return folder


@needs_kernel
@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL], ids=["sigint", "sigkill"])
def test_killed_notebook_run_resumes_to_identical_results(uninterrupted, tiny_model_dir, ipython_dir, tmp_path, how):
    process = _start(tmp_path, tiny_model_dir, ipython_dir, pause=2.0)
    deadline = time.monotonic() + 240
    while len(_generations(tmp_path)) < N_SETTINGS:  # the first concept is done
        assert process.poll() is None, (tmp_path / "papermill.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no generations after 240 s"
        time.sleep(0.01)
    _kill(process, how)
    done = len(_generations(tmp_path))
    assert N_SETTINGS <= done < N_CONCEPTS * N_SETTINGS, f"{done} entries: the kill came too late to test anything"
    _check_complete(tmp_path)
    kept = _entries(tmp_path / "cache")

    _finish(_start(tmp_path, tiny_model_dir, ipython_dir), tmp_path)  # the rerun continues
    after = _entries(tmp_path / "cache")
    assert {k: v for k, v in after.items() if k in kept} == kept  # what was finished was reused, not redone
    _same_files(uninterrupted / "results", tmp_path / "results")  # byte-identical results: resumable, deterministic
    _same_files(uninterrupted / "figures", tmp_path / "figures")
    _same_files(uninterrupted / "cache", tmp_path / "cache", finished_only=True)  # same keys and contents
