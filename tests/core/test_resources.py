"""Resource guards: batches halve on out-of-memory errors (same outputs, one warning), and the cache's disk use."""

from __future__ import annotations

import functools
import os
import subprocess
import warnings
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
import torch

from steer_utils import cache, paths
from steer_utils.core import decoding, extraction, prompting, resources, vectors
from steer_utils.experiments import pipeline, sadi
from steer_utils.paths import ROOT

STATEMENTS = [
    "Patience usually beats raw talent over a long career.",
    "Small towns remember everything.",
    "Most habits are easier to start than to break.",
    "A good teacher changes more lives than a good law.",
    "Cities feel smaller once you know a baker.",
    "Old maps are wrong in interesting ways.",
]
CPU_OOM = "[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 GB"


@pytest.fixture(autouse=True)
def fresh_limits():
    resources.reset()
    yield
    resources.reset()


@contextmanager
def out_of_memory_above(
    module: torch.nn.Module, limit: int, error=lambda: torch.OutOfMemoryError("CUDA out of memory.")
):
    """While active, `module`'s forward raises `error()` for inputs of more than `limit` rows; yields the failures."""
    original = module.forward
    failures = []

    @functools.wraps(original)  # keeps the signature, which `generate` inspects
    def forward(*args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[0] > limit:
            failures.append(ids.shape[0])
            raise error()
        return original(*args, **kwargs)

    module.forward = forward
    try:
        yield failures
    finally:
        del module.forward  # back to the class's method


def oom_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, resources.OutOfMemoryWarning)]


# --- halving_batches ----------------------------------------------------------------------------------------------
def test_is_out_of_memory_recognises_cuda_cpu_and_python_allocation_failures():
    assert resources.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert resources.is_out_of_memory(RuntimeError(CPU_OOM))
    assert resources.is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"))
    assert resources.is_out_of_memory(MemoryError("Unable to allocate 3.1 GiB for an array"))
    assert not resources.is_out_of_memory(RuntimeError("shape mismatch"))
    assert not resources.is_out_of_memory(ValueError("out of memory"))  # not an allocation error type
    assert not resources.is_out_of_memory(KeyboardInterrupt())


def test_halving_batches_retries_the_failed_batch_and_remembers_the_size():
    calls = []

    def run(batch):
        calls.append(list(batch))
        if len(batch) > 3:
            raise RuntimeError(CPU_OOM)
        return [x * 10 for x in batch]

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = resources.halving_batches(run, list(range(10)), 8, "toy")
    assert [x for part in out for x in part] == [x * 10 for x in range(10)]  # every item once, in order
    assert calls[0] == list(range(8)) and calls[1] == list(range(4)) and calls[2] == [0, 1]
    assert oom_warnings(record) == ["out of memory at batch size 8 in toy; retrying with 4"]  # said once
    assert resources.batch_limit("toy") == 2
    calls.clear()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        resources.halving_batches(run, list(range(4)), 8, "toy")  # starts at the remembered size
    assert calls == [[0, 1], [2, 3]] and not oom_warnings(record)
    with pytest.warns(resources.OutOfMemoryWarning, match="batch size 5 in other"):  # another call site: afresh
        resources.halving_batches(run, list(range(5)), 8, "other")


def test_halving_batches_raises_at_batch_size_one_and_passes_other_errors_through():
    def always(batch):
        raise torch.OutOfMemoryError("CUDA out of memory.")

    with (
        pytest.warns(resources.OutOfMemoryWarning),
        pytest.raises(resources.OutOfMemory, match="Out of memory in toy even at batch size 1") as info,
    ):
        resources.halving_batches(always, [1, 2, 3], 4, "toy")
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)
    calls = []

    def broken(batch):
        calls.append(batch)
        raise RuntimeError("expected a tensor")

    with pytest.raises(RuntimeError, match="expected a tensor"):
        resources.halving_batches(broken, [1, 2, 3], 4, "broken")
    assert len(calls) == 1  # not retried
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        resources.halving_batches(broken, [1], 0, "broken")


# --- On the tiny model --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "error", [lambda: torch.OutOfMemoryError("CUDA out of memory."), lambda: RuntimeError(CPU_OOM)], ids=["cuda", "cpu"]
)
def test_extraction_halves_its_batches_on_out_of_memory(tiny, error):
    model, tokenizer, _ = tiny
    prefixed, plain = prompting.paired_prompts(tokenizer, "moods", "Cheerful", STATEMENTS)
    n_tail = len(prompting.shared_tail(prefixed + plain))
    expected = extraction.extract(model, prefixed, n_tail, tokenizer.pad_token_id, 3, keep_user_attention=True)
    whole = extraction.extract(model, prefixed, n_tail, tokenizer.pad_token_id, 8, keep_user_attention=True)
    with out_of_memory_above(model.model, 3, error) as failures, warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        split = extraction.extract(
            model, prefixed, n_tail, tokenizer.pad_token_id, batch_size=8, keep_user_attention=True
        )
        again = extraction.extract(model, plain, n_tail, tokenizer.pad_token_id, batch_size=8)
    assert failures == [6]  # all six prompts fail, then batches of 3 run, and so does the next call
    assert oom_warnings(record) == ["out of memory at batch size 6 in extraction; retrying with 3"]
    for name in ("hidden", "attn_prefix", "attn_user"):
        assert torch.equal(getattr(split, name), getattr(expected, name)), name  # the same batches: bit-identical
        torch.testing.assert_close(getattr(split, name), getattr(whole, name), atol=1e-5, rtol=1e-5)
    assert again.hidden.shape[0] == len(plain)


def test_generation_splits_rows_on_out_of_memory_with_identical_responses(tiny):
    model, tokenizer, info = tiny
    torch.manual_seed(1)
    vec = vectors.ConceptVector(
        {b: torch.nn.functional.normalize(torch.randn(info.hidden_size), dim=0) for b in range(info.n_blocks)},
        {b: 5.0 for b in range(info.n_blocks)},
    )
    questions = ["Hi there.", "Tell me more about your favourite place.", "Why?"]
    args = (model, tokenizer, {"a": vec, "b": vec}, questions, [0.0, 2.0], {"a": [0, 1], "b": [1]})
    expected = pipeline.generate_grid(*args, max_new_tokens=6)
    with out_of_memory_above(model, 5) as failures, warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        split = pipeline.generate_grid(*args, max_new_tokens=6)
    assert failures == [12, 6]  # 12 rows fail, then 6, then pieces of 3 run
    assert oom_warnings(record) == ["out of memory at batch size 12 in generation; retrying with 6"]
    pd.testing.assert_frame_equal(split, expected)
    assert expected.response.nunique() > 1  # the rows really differ, so a mix-up would show
    with out_of_memory_above(model, 0), pytest.raises(resources.OutOfMemory, match="generation even at batch size 1"):
        decoding.generate(model, tokenizer, ["Hi there."], max_new_tokens=2)


def test_sadi_generation_splits_rows_with_their_own_scales(tiny):
    model, tokenizer, _ = tiny
    recorded = sadi.record_last_token(model, tokenizer, STATEMENTS, ("hidden",), batch_size=4)
    with out_of_memory_above(model.model, 2) as failures, pytest.warns(resources.OutOfMemoryWarning, match="SADI"):
        split = sadi.record_last_token(model, tokenizer, STATEMENTS, ("hidden",), batch_size=4)
    assert failures and torch.allclose(split["hidden"], recorded["hidden"], atol=1e-5)
    masks = [sadi.sadi_mask(recorded["hidden"][:3], recorded["hidden"][3:], k) for k in (1, 5, 20, 1)]
    questions = ["Hi there.", "Why?", "Tell me more.", "Hi there."]
    deltas = [5.0, 20.0, 80.0, 0.0]
    expected = sadi.generate_sadi(model, tokenizer, questions, masks, deltas, "hidden", "all", max_new_tokens=6)
    with out_of_memory_above(model, 1) as failures, pytest.warns(resources.OutOfMemoryWarning):
        split = sadi.generate_sadi(model, tokenizer, questions, masks, deltas, "hidden", "all", max_new_tokens=6)
    assert failures == [4, 2] and split == expected


# --- Disk use of the cache ----------------------------------------------------------------------------------------
def _populate(root: Path) -> None:
    files = {
        "models/smollm2-135m-abc/model.safetensors": 1000,
        "models/smollm2-135m-abc/config.json": 24,
        "models/.gemma3-270m-def-x1/model.safetensors": 500,  # a conversion that was killed
        "activations/k1.safetensors": 300,
        "activations/.k2.safetensors.tmpab": 7,
        "generations/smollm2-135m/g1.csv": 10,
        "generations/smollm2-135m/g1.fits.csv": 5,
        "generations/smollm2-135m/g1.vector.safetensors": 40,
        "generations/gemma3-270m/g2.csv": 11,
        "layers/smollm2-135m/l1.csv": 3,
        "sadi/smollm2-135m/s1.safetensors": 2,
        "baselines/smollm2-135m/b1.csv": 4,
        "test-outputs/results/smollm2-135m/01_fits.csv": 6,
        "stray.txt": 1,
    }
    for name, size in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x" * size)


def test_cache_info_lists_stages_models_and_leftovers(tmp_path, capsys):
    root = tmp_path / "cache"
    assert cache.cache_info(root) == [] and "No cache at" in cache.format_info([], root)
    _populate(root)
    rows = {r["stage"]: (r["files"], r["bytes"], r["temporary"]) for r in cache.cache_info(root)}
    assert rows == {
        "(top level)": (1, 1, 0),
        "activations": (1, 300, 1),
        "baselines/smollm2-135m": (1, 4, 0),
        "generations/gemma3-270m": (1, 11, 0),
        "generations/smollm2-135m": (3, 55, 0),
        "layers/smollm2-135m": (1, 3, 0),
        "models": (2, 1024, 1),
        "sadi/smollm2-135m": (1, 2, 0),
        "test-outputs": (1, 6, 0),
    }
    assert cache.main(["info", "--cache-dir", str(root)]) == 0
    out = capsys.readouterr().out
    assert "generations/smollm2-135m" in out and "1.4 KiB" in out and "clean-tmp" in out
    assert out.splitlines()[-2].split()[:2] == ["total", "12"]
    assert cache.human_size(512) == "512 B" and cache.human_size(3 * 2**30) == "3.0 GiB"


def test_clean_removes_the_cache_or_its_leftovers_never_results(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    _populate(root)
    assert cache.clean(root, temporary_only=True) == 507
    assert sum(r["temporary"] for r in cache.cache_info(root)) == 0 and (root / "activations/k1.safetensors").exists()
    results = tmp_path / "cache" / "my-results"
    monkeypatch.setattr(paths, "RESULTS_DIR", results)
    with pytest.raises(ValueError, match="Refusing to delete the cache"):
        cache.clean(root)
    with pytest.raises(ValueError, match="Refusing to delete the cache"):
        cache.clean(ROOT)  # the project itself (it holds results/ and figures/)
    monkeypatch.setattr(paths, "RESULTS_DIR", tmp_path / "results")
    assert cache.clean(root) > 0 and not root.exists()
    assert cache.clean(root) == 0  # nothing left: fine


def test_make_cache_info_and_clean_cache(tmp_path):
    root, results, figures = tmp_path / "cache", tmp_path / "results", tmp_path / "figures"
    _populate(root)
    results.mkdir()
    (results / "keep.csv").write_text("a\n1\n")
    env = dict(
        os.environ,
        STEER_CACHE_DIR=str(root),
        STEER_RESULTS_DIR=str(results),
        STEER_FIGURES_DIR=str(figures),
        PYTHONPATH=str(ROOT),
    )
    info = subprocess.run(["make", "-s", "cache-info"], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert "generations/gemma3-270m" in info.stdout and "total" in info.stdout
    done = subprocess.run(["make", "-s", "clean-cache"], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert "results/ and figures/ are untouched" in done.stdout
    assert not root.exists() and (results / "keep.csv").read_text() == "a\n1\n"
    refused = subprocess.run(
        ["make", "-s", "clean-cache"],
        cwd=ROOT,
        env=dict(env, STEER_CACHE_DIR=str(tmp_path)),
        capture_output=True,
        text=True,
    )
    assert refused.returncode != 0 and "Refusing" in refused.stderr and (results / "keep.csv").exists()


def test_write_csv_is_atomic_and_leaves_no_temporary_file(tmp_path):
    frame = pd.DataFrame({"a": [1, 2], "b": ["x", "y"]})
    path = cache.write_csv(frame, tmp_path / "sub" / "t.csv")
    assert path.read_text() == "a,b\n1,x\n2,y\n" and os.listdir(tmp_path / "sub") == ["t.csv"]

    class Boom(pd.DataFrame):
        def to_csv(self, *args, **kwargs):
            super().to_csv(*args, **kwargs)
            raise KeyboardInterrupt  # killed half way

    with pytest.raises(KeyboardInterrupt):
        cache.write_csv(Boom({"a": [3]}), path)
    assert path.read_text() == "a,b\n1,x\n2,y\n" and os.listdir(tmp_path / "sub") == ["t.csv"]  # old file intact


def test_registered_hooks_are_removed_on_exit_and_on_error():
    layer = torch.nn.Linear(2, 2)
    with resources.registered_hooks() as handles:
        handles.append(layer.register_forward_hook(lambda module, args, output: output * 0))
        assert torch.equal(layer(torch.ones(1, 2)), torch.zeros(1, 2))
    assert not layer._forward_hooks
    with pytest.raises(KeyboardInterrupt):
        with resources.registered_hooks() as handles:
            handles.append(layer.register_forward_pre_hook(lambda module, args: None))
            raise KeyboardInterrupt  # a stopped run
    assert not layer._forward_pre_hooks
