"""The benchmark (512 concepts in 5 classes), statements, questions, prompts and token bookkeeping.

Token positions are found from character offsets, never by searching for a hard-coded token,
so the same code serves every fast tokenizer and chat template:
- the prefix span: the tokens that overlap the prefix's characters in the rendered prompt;
- the shared tail: the tokens that start after the user text (for SmolLM2
  `<|im_end|>\\n<|im_start|>assistant\\n`), identical for every prompt of a model.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from ..core.prompting import CLASSES, EncodedPrompt, check_class, encode_prompt, prefix_text, user_text
from ..paths import CONCEPTS_DIR, QUESTIONS_FILE, STATEMENTS_FILE, check_shard


def read_lines(path: Path, what: str) -> list[str]:
    """Non-blank stripped lines of a UTF-8 file; errors on a missing, empty or duplicated list."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{what} file '{path}' does not exist; check the path (a UTF-8 text file, one entry per line)."
        )
    lines = [unicodedata.normalize("NFC", line.strip()) for line in path.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError(f"{what} file '{path}' is empty; put one entry per line.")
    seen: set[str] = set()
    dups = sorted({line for line in lines if line.casefold() in seen or seen.add(line.casefold())})
    if dups:
        raise ValueError(f"{what} file '{path}' has duplicated entries: {dups[:5]}; remove the repeats.")
    return lines


def load_concepts(concept_class: str, concepts_dir: Path = CONCEPTS_DIR) -> list[str]:
    """The concept names of one class, in benchmark order."""
    return read_lines(Path(concepts_dir) / f"{check_class(concept_class)}.txt", f"Concept list ({concept_class})")


def all_concepts(concepts_dir: Path = CONCEPTS_DIR) -> pd.DataFrame:
    """Every concept of the benchmark: columns `concept_class`, `concept`, `index` (order within its class)."""
    rows = [
        {"concept_class": cls, "concept": c, "index": i}
        for cls in CLASSES
        for i, c in enumerate(load_concepts(cls, concepts_dir))
    ]
    return pd.DataFrame(rows)


# The development split: concepts 22-25 of each class's seed-0 order (4 per class, 20 in all). Protocol choices
# (coefficient grid, scaling, system prompt, training data, contrastive negatives) are made on these concepts
# only (notebook 06); every sample below excludes them, whatever its seed or size. Positions 1-20 are the
# default profile's evaluation sample and position 21 is notebook 05's SADI tuning concept, so the split is
# disjoint from both, and excluding it leaves every seed-0 sample of up to 21 concepts per class unchanged.
DEVELOPMENT_SEED = 0
DEVELOPMENT_POSITIONS = range(21, 25)


def _class_order(rows: pd.DataFrame, seed: int, k: int) -> np.ndarray:
    """The seeded permutation of one class's concepts (k: the class's index in CLASSES)."""
    return np.random.default_rng([seed, k]).permutation(len(rows))


def _development_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The development split's rows of `all_concepts`' table, keeping the table's index."""
    frames = []
    for k, cls in enumerate(CLASSES):
        rows = table[table.concept_class == cls]
        order = _class_order(rows, DEVELOPMENT_SEED, k)
        frames.append(rows.iloc[order[[p for p in DEVELOPMENT_POSITIONS if p < len(rows)]]])
    return pd.concat(frames)


def development_concepts(n_per_class: int | None = None, concepts_dir: Path = CONCEPTS_DIR) -> pd.DataFrame:
    """The development split (4 concepts per class; the first `n_per_class` of each), on which protocol choices are
    made; never reported."""
    most = len(DEVELOPMENT_POSITIONS)
    if n_per_class is not None and (
        isinstance(n_per_class, bool) or not isinstance(n_per_class, int) or not 1 <= n_per_class <= most
    ):
        raise ValueError(
            f"The development split has {most} concepts per class; n_per_class must be 1..{most} or "
            f"None (all), got {n_per_class!r}."
        )
    rows = _development_rows(all_concepts(concepts_dir))
    return rows.groupby("concept_class", sort=False).head(n_per_class or most).reset_index(drop=True)


def sample_concepts(n_per_class: int | None, seed: int = 0, concepts_dir: Path = CONCEPTS_DIR) -> pd.DataFrame:
    """A fixed, seeded, stratified sample: `n_per_class` concepts of each class (None = all), never a development one.

    Each class is shuffled by its own seeded permutation, the development split is removed from it and the
    first n are kept, so a smaller sample is always contained in a larger one with the same seed.
    """
    if n_per_class is not None and (not isinstance(n_per_class, int) or n_per_class < 1):
        raise ValueError(f"n_per_class must be a positive integer or None (all), got {n_per_class!r}.")
    frames = []
    table = all_concepts(concepts_dir)
    development = _development_rows(table).index
    for k, cls in enumerate(CLASSES):
        rows = table[table.concept_class == cls]
        order = rows.iloc[_class_order(rows, seed, k)]
        frames.append(order[~order.index.isin(development)].iloc[:n_per_class])
    return pd.concat(frames, ignore_index=True)


def named_concepts(concepts: list[str] | str | Path, concepts_dir: Path = CONCEPTS_DIR) -> pd.DataFrame:
    """Your own concepts in place of a seeded sample: `class/name` strings, or a file of them (one per line).

    The class must be one of CLASSES (it decides the prefix template and the questions) and the name one of its
    list in data/concepts/ (case-insensitive), since the judge ranks a response against that list. Columns as
    `sample_concepts`.
    """
    if isinstance(concepts, (str, Path)):
        entries = read_lines(Path(concepts), "Concepts")
    elif isinstance(concepts, (list, tuple)) and concepts and all(isinstance(c, str) for c in concepts):
        entries = [unicodedata.normalize("NFC", c.strip()) for c in concepts]
    else:
        raise ValueError(
            f"concepts must be a list of 'class/name' strings or a file path, got {concepts!r}; "
            "e.g. ['fears/heights', 'places/Lisbon']."
        )
    table, rows = all_concepts(concepts_dir), []
    for entry in entries:
        concept_class, _, name = (part.strip() for part in entry.partition("/"))
        if not name:
            raise ValueError(
                f"Concept {entry!r} is not written 'class/name'; e.g. 'moods/Cheerful' (classes: {', '.join(CLASSES)})."
            )
        check_class(concept_class)
        known = table[(table.concept_class == concept_class) & (table.concept.str.casefold() == name.casefold())]
        if not len(known):
            raise ValueError(
                f"Concept {entry!r} is not in data/concepts/{concept_class}.txt; the judge scores "
                "a response by ranking the class's concepts, so add the name to that file first."
            )
        rows.append(
            {"concept_class": concept_class, "concept": known.concept.iloc[0], "index": int(known["index"].iloc[0])}
        )
    frame = pd.DataFrame(rows)
    repeated = frame[frame.duplicated(["concept_class", "concept"])]
    if len(repeated):
        raise ValueError(
            f"Concepts given twice: {(repeated.concept_class + '/' + repeated.concept).tolist()[:5]}; "
            "remove the repeats."
        )
    return frame


def load_statements(path: Path = STATEMENTS_FILE, n: int | None = None) -> list[str]:
    """The general training statements (the first `n`, or all)."""
    statements = read_lines(path, "Statements")
    if n is not None and (not isinstance(n, int) or n < 1):
        raise ValueError(f"n_statements must be a positive integer or None (all), got {n!r}.")
    return statements[:n]


def load_questions(path: Path = QUESTIONS_FILE) -> dict[str, list[str]]:
    """Five evaluation questions per class."""
    questions = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    missing = [c for c in CLASSES if not questions or c not in questions]
    if missing:
        raise ValueError(f"Questions file '{path}' has no questions for: {', '.join(missing)}.")
    return {c: list(questions[c]) for c in CLASSES}


def neighbour_concepts(
    concept_class: str, concept: str, k: int, after: bool = True, concepts_dir: Path = CONCEPTS_DIR
) -> list[str]:
    """The k concepts that follow `concept` in its class's benchmark list (or precede it, `after=False`), wrapping
    around the list's end; the class-contrastive negatives of a concept (those after it) and the held-out concepts
    its separation is measured against (those before it)."""
    names = load_concepts(concept_class, concepts_dir)
    folded = [n.casefold() for n in names]
    if concept.casefold() not in folded:
        raise ValueError(f"Concept {concept!r} is not in data/concepts/{concept_class}.txt; add it there first.")
    if not 0 <= k < len(names):
        raise ValueError(f"k must be in 0..{len(names) - 1} (the other concepts of {concept_class}), got {k}.")
    at, step = folded.index(concept.casefold()), 1 if after else -1
    return [names[(at + step * i) % len(names)] for i in range(1, k + 1)]


def prompt_token_table(tokenizer, prompt: EncodedPrompt, n_tail: int) -> pd.DataFrame:
    """One row per token of a prompt: position, id, token text and its part (template/prefix/user/tail)."""
    span = prompt.prefix_span or (-1, -1)
    tail_from = len(prompt.input_ids) - n_tail
    rows = []
    for pos, tok in enumerate(prompt.input_ids):
        part = (
            "tail"
            if pos >= tail_from
            else "prefix"
            if span[0] <= pos < span[1]
            else "user"
            if prompt.user_start <= pos < prompt.tail_start
            else "template"
        )
        rows.append(
            {"position": pos, "token_id": tok, "token": tokenizer.decode([tok]).replace("\n", "\\n"), "part": part}
        )
    return pd.DataFrame(rows)


def prefix_lengths(tokenizer, concepts: pd.DataFrame, statement: str) -> pd.DataFrame:
    """`concepts` with a `prefix_tokens` column: the prefix span length of each concept's prompt."""
    spans = [
        encode_prompt(tokenizer, user_text(statement, prefix_text(cls, c)), prefix_text(cls, c), c).prefix_span
        for cls, c in zip(concepts.concept_class, concepts.concept)
    ]
    return concepts.assign(prefix_tokens=[end - start for start, end in spans])


def statement_lengths(tokenizer, statements: list[str]) -> pd.DataFrame:
    """One row per statement: its words and tokens (without the chat template)."""
    tokens = tokenizer(statements, add_special_tokens=False)["input_ids"]
    return pd.DataFrame(
        {"statement": statements, "n_words": [len(s.split()) for s in statements], "n_tokens": [len(t) for t in tokens]}
    )


def data_summary(
    lengths: pd.DataFrame, sample: pd.DataFrame, statements: pd.DataFrame, n_used: int, tail: list[str]
) -> pd.DataFrame:
    """One row per class: benchmark and sample sizes, prefix and statement token lengths, the shared tail."""
    summary = lengths.groupby("concept_class", sort=False).agg(
        n_concepts=("concept", "size"),
        prefix_tokens_mean=("prefix_tokens", "mean"),
        prefix_tokens_max=("prefix_tokens", "max"),
    )
    summary["n_sampled"] = sample.groupby("concept_class", sort=False).size()
    summary["n_statements"] = len(statements)
    summary["n_statements_used"] = n_used
    summary["statement_tokens_mean"] = statements.n_tokens.mean()
    summary["n_tail"] = len(tail)
    summary["tail"] = " ".join(tail)
    return summary.round(3).reset_index()


def shard_concepts(sample: pd.DataFrame, shard_index: int, num_shards: int) -> pd.DataFrame:
    """Shard `shard_index` of `num_shards`: the sample's rows i with i % num_shards == shard_index, in order.

    Round-robin over the stratified sample, so every shard mixes the classes and the shards
    together hold every concept exactly once. `num_shards == 1` returns (a copy of) the sample.
    """
    shard_index, num_shards = check_shard(shard_index, num_shards)
    if num_shards > len(sample):
        raise ValueError(
            f"num_shards={num_shards} exceeds the {len(sample)} concepts of the sample, so some shards "
            f"would be empty; use at most {len(sample)} shards."
        )
    if num_shards == 1:
        return sample.copy()
    return sample.iloc[shard_index::num_shards].reset_index(drop=True)
