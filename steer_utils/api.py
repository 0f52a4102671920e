"""The public API: train a concept vector and steer a model with it in five lines.

    from steer_utils import load_model, train_concept_vector, generate
    model, tokenizer, _ = load_model("smollm2-135m")
    vector = train_concept_vector(model, tokenizer, "fears/heights")
    with vector.apply(model, 0.035):
        print(generate(model, tokenizer, "What should I do this weekend?", protocol=vector))

`train_concept_vector` checks its inputs, picks the contrast concepts and the cache, and calls `core.training.train`:
the notebooks' own fit under the adopted protocol, restricted to the blocks that protocol steers and scaled as it
scales, so `vector.apply(model, c)` adds exactly what `pipeline.run_concept` adds at coefficient c.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence

from .core import decoding, prompting, training
from .core.models import load_model
from .core.protocol import ADOPTED, Protocol, resolve_protocol
from .core.vectors import ConceptVector
from .experiments import data, pipeline
from .experiments.profiles import PROFILES

__all__ = [
    "load_model",
    "train_concept_vector",
    "generate",
    "parse_concept",
    "ConceptVector",
    "DEFAULT_STATEMENTS",
    "DEFAULT_SETTING",
]

DEFAULT_STATEMENTS = PROFILES["default"].n_statements  # training statements of a default-profile run (64)
DEFAULT_SETTING = training.OURS  # the paper's method: attention-selected token, soft labels, RFM
_CONCEPT_FORM = "write '<class>/<name>', e.g. 'fears/heights' or 'moods/cheerful'"


def parse_concept(concept: str) -> tuple[str, str]:
    """'fears/heights' -> ('fears', 'Heights'): the class and the name (a bundled concept's own spelling)."""
    if not isinstance(concept, str) or "/" not in concept:
        classes = ", ".join(prompting.CLASSES)
        raise ValueError(f"Concept {concept!r} needs its class: {_CONCEPT_FORM} (classes: {classes}).")
    concept_class, _, name = concept.partition("/")
    concept_class, name = concept_class.strip().lower(), name.strip()
    if concept_class not in prompting.CLASSES:
        raise ValueError(
            f"Unknown concept class {concept_class!r} in {concept!r}; use one of: "
            f"{', '.join(prompting.CLASSES)} ({_CONCEPT_FORM})."
        )
    if not name:
        raise ValueError(f"Concept {concept!r} has no name after the '/'; {_CONCEPT_FORM}.")
    bundled = {c.casefold(): c for c in data.load_concepts(concept_class)}
    return concept_class, bundled.get(name.casefold(), name)


def resolve_statements(statements: int | Sequence[str] | None) -> list[str]:
    """The training statements: given, the first n bundled ones (an int), or the first `DEFAULT_STATEMENTS` (None)."""
    if statements is None or (isinstance(statements, int) and not isinstance(statements, bool)):
        n = DEFAULT_STATEMENTS if statements is None else statements
        bundled = data.load_statements()
        if not 1 <= n <= len(bundled):
            raise ValueError(f"statements={n}: choose 1..{len(bundled)} bundled statements, or pass your own list.")
        return bundled[:n]
    if (
        not isinstance(statements, Sequence)
        or isinstance(statements, str)
        or not statements
        or not all(isinstance(s, str) and s.strip() for s in statements)
    ):
        raise ValueError(
            "statements must be a number of bundled statements (e.g. 32), a non-empty list of non-empty "
            "strings (your own training statements), or None for the default "
            f"{DEFAULT_STATEMENTS}."
        )
    return list(statements)


def train_concept_vector(
    model,
    tokenizer,
    concept: str,
    *,
    model_name: str = "model",
    statements: int | Sequence[str] | None = None,
    setting: str = DEFAULT_SETTING,
    protocol: Protocol | str | None = None,
    seed: int = 0,
    batch_size: int = 16,
    cache: bool = False,
) -> ConceptVector:
    """Train the concept vector of `concept` ('class/name') on `model`, ready for `vector.apply(model, coefficient)`.

    statements: your training statements, or how many bundled ones (default `DEFAULT_STATEMENTS`); setting: token
    selection-labels-method, e.g. 'attention-soft-rfm'; protocol: a `Protocol`, its name ('paper', 'contrast=3')
    or None for `protocol.ADOPTED`. The concept need not be bundled; a protocol with contrast concepts (ADOPTED's 3
    neighbours in the class list) needs a bundled one, so an unbundled concept trains without contrast (warning).
    The vector holds the protocol's steered blocks only (every block but the first for ADOPTED), its norms are what
    the coefficient multiplies (the block norms, mean_norm's mean, times the protocol's eps multiplier).
    cache=True reads and writes the activations in the disk cache, keyed by `model_name` (then required).
    The vector records its protocol (`vector.protocol`, saved with it): `apply` steers at its positions, and
    `generate(..., protocol=vector)` asks under its system prompt.
    """
    concept_class, name = parse_concept(concept)
    training.Setting.parse(setting)  # a bad setting fails before any extraction
    protocol = protocol if isinstance(protocol, Protocol) else resolve_protocol(protocol)
    statements = resolve_statements(statements)
    if cache and model_name == "model":
        raise ValueError(
            "cache=True keys the cached activations by model_name; pass the model's name, e.g. "
            "model_name='smollm2-135m' (or leave cache=False)."
        )
    bundled = name in data.load_concepts(concept_class)  # parse_concept gave a bundled concept its own spelling
    if protocol.contrast and not bundled:
        warnings.warn(
            f"Concept {concept_class}/{name} is not bundled (data/concepts/{concept_class}.txt), so it has "
            f"no contrast concepts; training without them (protocol contrast={protocol.contrast} -> 0).",
            stacklevel=2,
        )
        protocol = dataclasses.replace(protocol, contrast=0)
    return training.train(
        model,
        tokenizer,
        concept_class,
        name,
        statements,
        protocol=protocol,
        setting=setting,
        contrast=pipeline.contrast_concepts(concept_class, name, protocol),
        model_name=model_name,
        seed=seed,
        batch_size=batch_size,
        extractor=pipeline.extractor(model_name if cache else None),
    )


def generate(
    model,
    tokenizer,
    question: str,
    max_new_tokens: int = 50,
    protocol: Protocol | ConceptVector | str | None = None,
    stop_loops: bool = True,
) -> str:
    """The model's greedy answer to one chat-templated question, steered by any active `ConceptVector.apply`.

    protocol: whose system prompt frames the question: a vector (the protocol it was trained under), a `Protocol`, its
    name, or None for `protocol.ADOPTED` (the chat template's default system prompt). Pass the vector you apply, so
    the answer is asked as its training prompts were.
    stop_loops: once the answer repeats a short cycle three times, repeat it to the end instead of decoding on, as the
    notebooks do (`core.decoding`); False decodes every token.
    """
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"question must be a non-empty string, got {question!r}.")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")
    if isinstance(protocol, ConceptVector):
        protocol = protocol.protocol or ADOPTED  # a vector made without one: the default
    protocol = protocol if isinstance(protocol, Protocol) else resolve_protocol(protocol)
    # One `model.generate` call over the whole prompt, so an active positions='answer' `apply` steers only the answer.
    return decoding.generate_reference(
        model, tokenizer, [question], max_new_tokens=max_new_tokens, system=protocol.system, stop_loops=stop_loops
    )[0]
