"""Precision: `auto` means fp32 on every CPU; the bf16 path runs (and is checked) on any CPU; the RFM solve never hangs.

The bf16 tests force the code path a CPU with AMX / AVX512-BF16 takes (monkeypatching the capability check) on a
tiny random model, so a bf16-only failure shows on the AMD machines too (torch emulates bf16 there, slow but exact);
the path a CPU without them takes (linear layers summed in fp32, `models.BF16Linear`) is checked against it.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import pandas as pd
import pytest
import torch

from steer_utils.core import decoding, extraction, models, prompting, steering, vectors
from steer_utils.experiments import data
from steer_utils.paths import ROOT
from steer_utils.tools import provenance
from tests.experiments.test_pipeline_units import HIDDEN_TOLERANCE, assert_fast_path_matches_reference


@pytest.mark.parametrize("native_bf16", [True, False], ids=["native-bf16", "emulated-bf16"])
def test_auto_is_float32_on_every_cpu(monkeypatch, native_bf16):
    monkeypatch.setattr(models, "cpu_has_fast_bf16", lambda: native_bf16)
    assert models.resolve_dtype("auto", "cpu") == torch.float32
    assert models.resolve_dtype("float32", "cpu") == torch.float32
    assert models.resolve_dtype("bfloat16", "cpu") == torch.bfloat16  # an explicit choice is kept


def test_auto_on_cuda_is_bf16_or_fp16(monkeypatch):
    for supported, expected in ((True, torch.bfloat16), (False, torch.float16)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: supported)
        assert models.resolve_dtype("auto", "cuda") == expected


def test_unknown_dtype_names_the_choices():
    assert models.resolve_dtype(torch.float16) == torch.float16  # a torch dtype passes through
    with pytest.raises(ValueError, match="Unknown dtype 'bf32'; use auto .*float32, bfloat16"):
        models.resolve_dtype("bf32", "cpu")


def test_a_native_bf16_cpu_still_loads_float32_by_default(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(models, "cpu_has_fast_bf16", lambda: True)  # what an Intel AMX machine reports
    model, _, info = models.load_model(str(tiny_model_dir), device="cpu")
    assert info.dtype == "float32" and next(model.parameters()).dtype == torch.float32


@pytest.fixture(scope="module")
def tiny_bf16(sharp_model_dir):
    """The sharp tiny model loaded in bf16, as on a CPU with native bf16 (no emulation warning)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(models, "cpu_has_fast_bf16", lambda: True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            return models.load_model(str(sharp_model_dir), dtype="bfloat16", device="cpu")


def test_bf16_model_and_its_provenance(tiny_bf16, tmp_path):
    model, _, info = tiny_bf16
    assert info.dtype == "bfloat16" and next(model.parameters()).dtype == torch.bfloat16
    versions = pd.read_csv(provenance.write_versions(tmp_path, info)).set_index("package").version
    assert versions["dtype"] == "bfloat16" and versions["device"] == "cpu"
    assert versions["torch"] == torch.__version__ and "bf16" in versions["cpu"]


def test_bf16_fast_extraction_matches_the_reference_loop(tiny_bf16):
    model, tokenizer, _ = tiny_bf16
    assert_fast_path_matches_reference(model, tokenizer, "moods", "Cheerful", data.load_statements(n=24), batch_size=5)


def test_bf16_linear_rounds_an_fp32_sum_of_exact_products():
    generator = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(64, 32).to(torch.bfloat16)
    x = torch.randn(5, 7, 64, generator=generator).to(torch.bfloat16)
    exact = torch.nn.functional.linear(x.double(), layer.weight.double(), layer.bias.double())  # (5, 7, 32)
    assert models.widen_bf16_linears(torch.nn.Sequential(layer)) == 1 and type(layer) is models.BF16Linear
    out = layer(x)
    assert out.dtype == torch.bfloat16 and layer.weight.dtype == torch.float32
    # fp32 sums differ from the exact sum by far less than one bf16 step, so at most a tie rounds the other way
    torch.testing.assert_close(out.double(), exact.to(torch.bfloat16).double(), atol=0, rtol=2**-8)
    assert (out.double() == exact.to(torch.bfloat16).double()).float().mean() > 0.99


def test_a_cpu_without_native_bf16_computes_bf16_linears_in_fp32(sharp_model_dir, tiny_bf16, monkeypatch):
    """Same model, same bf16 values: the widened linears give the native path's hidden states within its bf16
    tolerance (the summation order differs), and the model still reads as bf16 with the same parameter count."""
    monkeypatch.setattr(models, "cpu_has_fast_bf16", lambda: False)
    model, tokenizer, info = models.load_model(str(sharp_model_dir), dtype="bfloat16", device="cpu")
    native, _, native_info = tiny_bf16
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is models.BF16Linear for m in linears)
    assert not any(type(m) is models.BF16Linear for m in native.modules())
    assert info.dtype == "bfloat16" and next(model.parameters()).dtype == torch.bfloat16
    assert info.n_parameters == native_info.n_parameters
    ids = torch.tensor([tokenizer("A small test sentence about the sea.")["input_ids"]])
    with torch.inference_mode():
        ours, theirs = model(ids, output_hidden_states=True), native(ids, output_hidden_states=True)
    atol, rtol = HIDDEN_TOLERANCE[torch.bfloat16]
    for mine, reference in zip(ours.hidden_states, theirs.hidden_states):
        assert mine.dtype == torch.bfloat16
        torch.testing.assert_close(mine, reference, atol=atol * reference.abs().amax().item(), rtol=rtol)
    assert decoding.generate(model, tokenizer, ["Tell me about your day."], max_new_tokens=6)[0]


def _tail_states(model, prompt, n_tail: int) -> torch.Tensor:
    return extraction.extract_reference(model, [prompt], n_tail).hidden[0, :-1]  # (n_blocks - 1, n_tail, d)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_tolerances_catch_a_position_error(sharp_model_dir, monkeypatch, dtype):
    """A prompt whose tokens sit one position later (what a padding or position-id bug does) moves the tail's
    hidden states by far more than the tolerance the fast-vs-reference test allows in that precision."""
    monkeypatch.setattr(models, "cpu_has_fast_bf16", lambda: True)
    model, tokenizer, _ = models.load_model(str(sharp_model_dir), dtype=dtype, device="cpu")
    prefixed, plain = prompting.paired_prompts(tokenizer, "moods", "Cheerful", data.load_statements(n=2))
    n_tail = len(prompting.shared_tail(prefixed + plain))
    prompt = prefixed[0]
    shifted = prompting.EncodedPrompt(**{**prompt.__dict__, "input_ids": [tokenizer.pad_token_id, *prompt.input_ids]})
    right, wrong = _tail_states(model, prompt, n_tail), _tail_states(model, shifted, n_tail)
    atol, rtol = HIDDEN_TOLERANCE[getattr(torch, dtype)]
    excess = (wrong - right).abs() / (atol * right.abs().amax() + rtol * right.abs())
    assert excess.max() > 1.5, f"a position error moves states by only {excess.max():.2f}x the tolerance"


@torch.inference_mode()
def test_bf16_steering_adds_in_the_model_precision(tiny_bf16):
    model, tokenizer, info = tiny_bf16
    ids = torch.tensor([tokenizer("A small test sentence.")["input_ids"]])
    base = model(ids).logits
    v = torch.nn.functional.normalize(torch.randn(info.hidden_size, generator=torch.Generator().manual_seed(0)), dim=0)
    vec = vectors.ConceptVector({0: v, 1: v}, {0: 2.0, 1: 3.0})
    with steering.steer(model, vectors.steering_additions([vec], [0.0], [0, 1])):
        torch.testing.assert_close(model(ids).logits, base, atol=0, rtol=0)  # eps 0: bit-identical, in bf16 too
    with steering.steer(model, vectors.steering_additions([vec], [0.5], [1])):
        assert not torch.equal(model(ids).logits, base)
    torch.testing.assert_close(model(ids).logits, base, atol=0, rtol=0)  # hooks gone
    first = decoding.generate(model, tokenizer, ["Tell me about your day."] * 2, max_new_tokens=6)
    assert first == decoding.generate(model, tokenizer, ["Tell me about your day."] * 2, max_new_tokens=6)


# --- RFM: many fits in one process --------------------------------------------------------------------------------
_MANY_FITS = """
import sys, torch
from steer_utils.core import vectors
from tests.core.test_precision import synthetic_concept
torch.save(torch.stack([vectors.fit_rfm(*synthetic_concept(i))[0] for i in range(int(sys.argv[2]))]), sys.argv[1])
"""


def synthetic_concept(index: int, n: int = 300, n_blocks: int = 3, d: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (n, n_blocks, d) and soft labels (n, n_blocks) of a planted concept: y rises along one direction."""
    generator = torch.Generator().manual_seed(index)
    X = torch.randn(n, n_blocks, d, generator=generator) * 3 + 1
    direction = torch.nn.functional.normalize(torch.randn(n_blocks, d, generator=generator), dim=-1)
    y = torch.sigmoid((X * direction).sum(-1))  # (n, n_blocks), values in (0, 1)
    return X, y


def test_many_rfm_fits_in_one_process_finish_and_match_single_fits(tmp_path):
    """20 concepts fitted back to back in a fresh process (where MKL's batched LU once hung) finish within the
    timeout and give the vectors each concept gets when fitted alone here."""
    n_concepts, out = 20, tmp_path / "many.pt"
    subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_MANY_FITS), str(out), str(n_concepts)],
        check=True,
        timeout=600,
        cwd=str(ROOT),
    )
    many = torch.load(out)  # (n_concepts, n_blocks, d)
    assert many.shape == (n_concepts, 3, 48) and torch.isfinite(many).all()
    for index in (0, n_concepts // 2, n_concepts - 1):
        X, y = synthetic_concept(index)
        alone, settings = vectors.fit_rfm(X, y)
        # threaded BLAS sums in a varying order and the RFM's iterations amplify it (seen: 3e-4 of one entry)
        assert torch.nn.functional.cosine_similarity(many[index], alone, dim=-1).min() > 0.9999
        assert min(s["val_corr"] for s in settings) > 0.5  # the planted direction is found


def test_rfm_solve_matches_a_float64_solve_and_refuses_nan():
    generator = torch.Generator().manual_seed(0)
    X = torch.randn(4, 50, 6, generator=generator)
    K = torch.exp(-torch.cdist(X, X)) + 1e-3 * torch.eye(50)
    b = torch.randn(4, 50, 1, generator=generator)
    exact = torch.linalg.solve(K.double(), b.double()).float()
    torch.testing.assert_close(vectors._solve(K, b), exact, atol=1e-5, rtol=1e-5)
    K[1, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="contains NaN or inf"):
        vectors._solve(K, b)
