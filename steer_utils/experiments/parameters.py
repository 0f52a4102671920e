"""The papermill parameters of every notebook, checked before anything runs: one clear error per bad value."""

from __future__ import annotations

import math
import numbers

from ..core.protocol import resolve_protocol
from ..paths import check_shard
from .profiles import PROFILES


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _positive_int(value) -> bool:
    return _is_int(value) and value >= 1


def _list_of(test):
    return lambda value: isinstance(value, (list, tuple)) and len(value) > 0 and all(test(v) for v in value)


def _nulls() -> tuple[str, ...]:
    from ..core.enrichment import NULLS  # imports torch: only when a notebook has a `null` parameter

    return NULLS


def _dtypes() -> tuple[str, ...]:
    from ..core.models import DTYPES  # imports torch: only when a notebook has a `dtype` parameter

    return ("auto", *DTYPES)


def _block_sets() -> tuple[str, ...]:
    from .baselines import OURS_CANDIDATES  # imports torch: only when a notebook has a `block_set` parameter

    return OURS_CANDIDATES


def _is_protocol(value) -> bool:
    try:
        resolve_protocol(value)
    except (ValueError, TypeError):
        return False
    return True


_NUMBER_HINT = " (a number, not a string: no -r, no quotes in -y)"


_LIST_HINT = " (lists need -y: -p passes a number or a string)"


def _optional_size(v) -> bool:
    return v is None or _positive_int(v)


# Papermill parameter -> (what it must be, the check, a correct way to pass it, the hint for a value of the wrong
# type). `n_*` and `*_per_class` names not listed here must be a positive integer or None.
# The judges a notebook can load by name alone (the OpenAI-compatible one needs a server: use the API for it).
NOTEBOOK_JUDGES = ("llm", "embedding")


PARAMETERS = {
    "model": (
        "a non-empty string (a bundled name, a Hugging Face id or a local path)",
        lambda v: isinstance(v, str) and bool(v.strip()),
        "-p model smollm2-135m",
        "",
    ),
    "profile": (
        f"one of {', '.join(PROFILES)}",
        lambda v: isinstance(v, str) and v in PROFILES,
        "-p profile smoke",
        "",
    ),
    "judge_name": (
        f"one of {', '.join(NOTEBOOK_JUDGES)}",
        lambda v: isinstance(v, str) and v in NOTEBOOK_JUDGES,
        "-p judge_name llm",
        "",
    ),
    "dtype": (
        lambda: f"one of {', '.join(_dtypes())}",
        lambda v: isinstance(v, str) and v in _dtypes(),
        "-p dtype float32",
        "",
    ),
    "seed": ("a non-negative integer", lambda v: _is_int(v) and v >= 0, "-p seed 0", _NUMBER_HINT),
    "stop_loops": (
        "True or False",
        lambda v: isinstance(v, bool),
        "-p stop_loops False",
        " (papermill reads -p stop_loops False as a boolean; quotes make it a string)",
    ),
    "n_concepts_per_class": (
        "a positive integer or None (the profile's value)",
        _optional_size,
        "-p n_concepts_per_class 5",
        _NUMBER_HINT,
    ),
    "n_statements": (
        "a positive integer or None (the profile's value)",
        _optional_size,
        "-p n_statements 64",
        _NUMBER_HINT,
    ),
    "layer_concepts_per_class": (
        "a positive integer or None (the profile's value)",
        _optional_size,
        "-p layer_concepts_per_class 3",
        _NUMBER_HINT,
    ),
    "tune_concepts_per_class": ("a positive integer", _positive_int, "-p tune_concepts_per_class 1", _NUMBER_HINT),
    "n_draws": ("a positive integer", _positive_int, "-p n_draws 1000", _NUMBER_HINT),
    "n_random": ("a positive integer or None (the profile's value)", _optional_size, "-p n_random 3", _NUMBER_HINT),
    "n_depth_bins": ("a positive integer", _positive_int, "-p n_depth_bins 10", _NUMBER_HINT),
    "fractions": (
        "a non-empty list of numbers in (0, 1] or None (the profile's value)",
        lambda value: value is None or _list_of(lambda v: _is_number(v) and 0 < v <= 1)(value),
        "-y 'fractions: [0.25, 0.5]'",
        _LIST_HINT,
    ),
    "window_coefficients": (
        "None (the profile's wide grid) or a list of at least 4 positive numbers",
        lambda value: value is None or (_list_of(lambda v: _is_number(v) and v > 0)(value) and len(value) >= 4),
        "-y 'window_coefficients: [0.0025, 0.005, 0.0075, 0.01, 0.015]'",
        _LIST_HINT,
    ),
    "eps_grid": (
        "a non-empty list of positive numbers",
        _list_of(lambda v: _is_number(v) and v > 0),
        "-y 'eps_grid: [0.02, 0.05, 0.1]'",
        _LIST_HINT,
    ),
    "alpha": ("a number in (0, 1)", lambda v: _is_number(v) and 0 < v < 1, "-p alpha 0.01", _NUMBER_HINT),
    "fdr_level": ("a number in (0, 1)", lambda v: _is_number(v) and 0 < v < 1, "-p fdr_level 0.05", _NUMBER_HINT),
    "null": (
        lambda: f"one of {', '.join(_nulls())}",
        lambda v: isinstance(v, str) and v in _nulls(),
        "-p null scattered",
        "",
    ),
    "block_set": (
        lambda: f"one of auto, {', '.join(_block_sets())}",
        lambda v: isinstance(v, str) and (v == "auto" or v in _block_sets()),
        "-p block_set auto",
        "",
    ),
    "steering_protocol": (
        "None (notebook 06's choice), 'paper', or fields such as 'contrast=3,positions=answer' (see protocol.py)",
        _is_protocol,
        "-p steering_protocol paper (make: PROTOCOL=paper)",
        "",
    ),
    "concepts": (
        "None (the seeded sample), a file path, or a non-empty list of 'class/name' strings",
        lambda v: (
            v is None
            or (isinstance(v, str) and bool(v.strip()))
            or _list_of(lambda c: isinstance(c, str) and bool(c.strip()))(v)
        ),
        "-y 'concepts: [fears/heights, places/Lisbon]'",
        _LIST_HINT,
    ),
    "models": (
        "None or a non-empty list of model names",
        lambda v: v is None or _list_of(lambda m: isinstance(m, str) and bool(m.strip()))(v),
        "-y 'models: [smollm2-135m, gemma3-270m]'",
        _LIST_HINT,
    ),
}


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_parameters(**params) -> None:
    """Validate a notebook's papermill parameters by name, before any expensive work (call it first).

    Raises one ValueError for the first bad parameter, naming it, its value and type, the expected form and how to
    pass it (papermill's `-p` parses numbers but not lists; `-r` and quoted YAML values stay strings).
    `shard_index` and `num_shards` are checked together by `paths.check_shard`.
    """
    for name, value in params.items():
        if name in ("shard_index", "num_shards"):
            continue
        rule = PARAMETERS.get(name)
        if rule is None and (name.startswith("n_") or name.endswith("_per_class")):
            rule = ("a positive integer or None", _optional_size, f"-p {name} 4", _NUMBER_HINT)
        if rule is None:
            raise ValueError(
                f"check_parameters has no rule for parameter '{name}'; add one to parameters.PARAMETERS "
                f"(known: {', '.join(PARAMETERS)}, shard_index, num_shards)."
            )
        expected, valid, example, hint = rule
        if not valid(value):
            expected = expected() if callable(expected) else expected
            wrong_type = isinstance(value, str) if hint == _NUMBER_HINT else not isinstance(value, (list, tuple))
            raise ValueError(
                f"Parameter {name} must be {expected}, got {_shown(value)} ({type(value).__name__}); "
                f"pass e.g. {example}{hint if hint and wrong_type else ''}."
            )
    if "shard_index" in params or "num_shards" in params:
        check_shard(params.get("shard_index", 0), params.get("num_shards", 1))
