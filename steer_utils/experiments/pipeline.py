"""One concept end to end: prompts -> activations -> token selection -> labels -> vectors -> steered generations.

A *setting* names the three choices the paper ablates: token selection, labels and vector method
(e.g. `attention-soft-rfm`). Activations are cached per prompt set (the unprefixed ones once per
model and statement set); each concept's generations are cached too, so an interrupted run resumes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Sequence

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from ..cache import atomic_write, cache_key, cached_tensors, entry_path, upstream_versions
from ..core import decoding, extraction, prompting, steering, training
from ..core.decoding import generate
from ..core.extraction import EXTRACTION_VERSION, Activations, extract
from ..core.prompting import EncodedPrompt
from ..core.protocol import ADOPTED, PAPER, Protocol
from ..core.training import OURS, ConceptActivations, Setting
from ..core.vectors import ConceptVector, steering_additions
from . import data, judge

# Bump when token selection, labels, vector fitting, enrichment or steered generation change their results;
# every generations/layers/baselines entry is then recomputed. 2: generation with SDPA attention. 3: a contrast
# concept's activations are its own prefixed extraction, shared (`training.concept_activations`).
PIPELINE_VERSION = 3
COEFFICIENTS = (0.015, 0.025, 0.035, 0.05)
# The negative controls' setting names: a random direction with a vector's blocks and norms over the same grid, and
# the unsteered answers (coefficient 0). Judged like any setting, they say how often the judge credits a concept
# the model was never steered towards.
CONTROL_RANDOM, CONTROL_UNSTEERED = "control-random", "control-unsteered"
CONTROLS = (CONTROL_RANDOM, CONTROL_UNSTEERED)


def contrast_concepts(concept_class: str, concept: str, protocol: Protocol = ADOPTED) -> list[str]:
    """The concepts whose prefixed prompts join a concept's negatives: its `protocol.contrast` class neighbours."""
    return data.neighbour_concepts(concept_class, concept, protocol.contrast) if protocol.contrast else []


def training_prompts(
    tokenizer, concept_class: str, concept: str, statements: list[str], protocol: Protocol = ADOPTED
) -> tuple[list, list, list]:
    """`training.training_prompts` of a benchmark concept, with its contrast neighbours."""
    contrast = contrast_concepts(concept_class, concept, protocol)
    return training.training_prompts(tokenizer, concept_class, concept, statements, protocol, contrast)


def tail_tokens(
    tokenizer, concept_class: str, concept: str, statements: list[str], protocol: Protocol = ADOPTED
) -> list[str]:
    """The tail tokens every training prompt of a concept shares (`ConceptActivations.tail`), by tokenising only."""
    prefixed, plain, others = training_prompts(tokenizer, concept_class, concept, statements, protocol)
    prompts = prefixed + plain + [p for prompts in others for p in prompts]
    return prompting.tail_token_names(tokenizer, prompting.shared_tail(prompts))


def extractor(model_key: str | None) -> training.Extractor:
    """`extraction.extract` reading and writing the disk cache under `model_key` (None: no cache)."""
    if model_key is None:
        return extraction.extract
    return lambda model, prompts, *args, **options: extract_cached(model, model_key, prompts, *args, **options)


def concept_activations(
    model,
    tokenizer,
    model_key: str,
    concept_class: str,
    concept: str,
    statements: list[str],
    batch_size: int = 16,
    cached: bool = True,
    protocol: Protocol = ADOPTED,
) -> ConceptActivations:
    """`training.concept_activations` of a benchmark concept with its contrast neighbours, from the disk cache
    (keyed by `model_key`) unless `cached=False`."""
    contrast = contrast_concepts(concept_class, concept, protocol)
    return training.concept_activations(
        model, tokenizer, concept_class, concept, statements, protocol, contrast, batch_size,
        extractor(model_key if cached else None),
    )  # fmt: skip


def fit_setting(
    acts: training.ConceptActivations, setting: training.Setting, model_name: str, seed: int = 0
) -> tuple[ConceptVector, pd.DataFrame]:
    """Concept vector of one setting (`training.fit`), and a per-block table of the selected token and fit details."""
    vector, details, chosen = training.fit(acts, setting, model_name, seed)
    table = pd.DataFrame(details).assign(
        concept_class=acts.concept_class,
        concept=acts.concept,
        setting=setting.name,
        selected=chosen,
        selected_token=[acts.tail[i] for i in chosen],
    )
    return vector, table


@dataclass(frozen=True, eq=False)
class RunContext:
    """What every runner of a notebook shares: the loaded model, the data it runs on and how it generates.

    Runners take one and only what differs between their calls (a concept, settings, coefficients, a protocol).
    """

    model: torch.nn.Module
    tokenizer: object
    model_name: str  # as given to `load_model` (bundled name, HF id or path): cache keys and results use it
    statements: list[str]  # training statements
    questions: dict[str, list[str]]  # evaluation questions per concept class
    max_new_tokens: int = 50
    seed: int = 0
    batch_size: int = 16  # prompts per extraction batch
    stop_loops: bool = True  # end a response once it loops (`decoding.loop_start`); False decodes every token
    coefficients: tuple[float, ...] = COEFFICIENTS  # the eps grid steered over: a model's window (notebook 07)

    def activations(self, concept_class: str, concept: str, protocol: Protocol = ADOPTED) -> ConceptActivations:
        """`concept_activations` of one concept with this context's model, statements and batch size (cached)."""
        return concept_activations(
            self.model,
            self.tokenizer,
            self.model_name,
            concept_class,
            concept,
            self.statements,
            self.batch_size,
            protocol=protocol,
        )


def for_each_concept(sample: pd.DataFrame, run_one, desc: str) -> tuple[pd.DataFrame, ...]:
    """`run_one(concept_class, concept)` -> a tuple of tables, for every concept of a sample; each concatenated."""
    parts = [run_one(row.concept_class, row.concept) for row in tqdm(list(sample.itertuples()), desc=desc)]
    return tuple(pd.concat(tables, ignore_index=True) for tables in zip(*parts))


def steering_inputs(context: RunContext, concept_class: str, concept: str, coefficients) -> dict:
    """What a concept's steered generations depend on, for their cache keys (also of notebook 03's and 05's).

    Includes the code versions of the stages they build on (activations; for the baselines also this module's
    generation code), so bumping EXTRACTION_VERSION or PIPELINE_VERSION never reuses generations made from the
    old activations or code. Those versions enter the key only once they differ from the ones the existing
    cache entries were made with (see `cache.upstream_versions`), so adding them did not invalidate the cache.
    """
    return dict(
        model=context.model_name,
        dtype=str(next(context.model.parameters()).dtype),
        concept=[concept_class, concept],
        statements=hashlib.sha256("\n".join(context.statements).encode()).hexdigest(),
        questions=list(context.questions[concept_class]),
        coefficients=list(coefficients),
        max_new_tokens=context.max_new_tokens,
        seed=context.seed,
        **decoding_inputs(context.stop_loops),
        **upstream_versions(
            {"extraction": extraction.EXTRACTION_VERSION, "pipeline": PIPELINE_VERSION},
            written_with={"extraction": 2, "pipeline": 2},
        ),
    )


def decoding_inputs(stop_loops: bool) -> dict:
    """The decoder's cache-key input: the loop rule when rows that loop are stopped; nothing when every token is
    decoded, so those keys are the ones entries had before loop stopping existed."""
    return {"loops": f"{decoding.LOOP_REPEATS}x{decoding.LOOP_MAX_PERIOD}"} if stop_loops else {}


def generation_keys(
    context: RunContext,
    concept_class: str,
    concept: str,
    settings: list[Setting],
    coefficients=None,
    blocks=None,
    protocol: Protocol = ADOPTED,
) -> dict[str, str]:
    """The cache key of each setting's generations for one concept (`run_concept`'s entries), by setting name.

    The protocol enters the key only where it differs from the paper's, so the paper protocol's keys are unchanged.
    `coefficients` defaults to the context's grid.
    """
    coefficients = context.coefficients if coefficients is None else coefficients
    if blocks is None:
        blocks = protocol.steered_blocks(len(steering.find_blocks(context.model)))[0]
    blocks = list(blocks)
    common = steering_inputs(context, concept_class, concept, coefficients) | dict(blocks=blocks)
    common |= protocol.key_inputs()
    return {s.name: cache_key("generations", PIPELINE_VERSION, setting=s.name, **common) for s in settings}


def run_concept(
    context: RunContext,
    concept_class: str,
    concept: str,
    settings: list[Setting],
    coefficients=None,
    blocks=None,
    protocol: Protocol = ADOPTED,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Fit every setting for one concept and generate its coefficient × question grid under `protocol`.

    Each (concept, setting) is cached on its own (generations, fit table and the concept vector as
    safetensors with its metadata), so notebooks that share a setting share its generations; the
    settings not cached yet are generated together in one batched call. `blocks` (default: the protocol's)
    overrides the steered blocks; the protocol's eps multiplier applies either way (`eps` column).
    `coefficients` defaults to the context's grid.
    Returns (generations: one row per setting × coefficient × question, fits: one row per setting × block).
    """
    coefficients = context.coefficients if coefficients is None else coefficients
    if not len(coefficients):
        raise ValueError("The coefficient grid is empty; give at least one coefficient.")
    model, name = context.model, context.model_name
    keys = generation_keys(context, concept_class, concept, settings, coefficients, blocks, protocol)
    default_blocks, multiplier = protocol.steered_blocks(len(steering.find_blocks(model)))
    blocks = default_blocks if blocks is None else list(blocks)
    gen_path = {setting: entry_path("generations", key, ".csv", name) for setting, key in keys.items()}
    fit_path = {setting: entry_path("generations", key, ".fits.csv", name) for setting, key in keys.items()}
    missing = [s for s in settings if not gen_path[s.name].exists()]
    if missing:
        acts = context.activations(concept_class, concept, protocol)
        fitted = {s.name: fit_setting(acts, s, name, context.seed) for s in missing}
        grid = generate_grid(
            model,
            context.tokenizer,
            {k: v.scaled(protocol.scaling, blocks) for k, (v, _) in fitted.items()},
            context.questions[concept_class],
            coefficients,
            blocks,
            context.max_new_tokens,
            {k: multiplier for k in fitted},
            protocol,
            context.stop_loops,
        )
        grid.insert(0, "concept", concept)
        grid.insert(0, "concept_class", concept_class)
        if protocol.changes():  # the paper protocol's tables keep their columns
            grid["protocol"] = protocol.name
            grid["eps"] = grid.coefficient * multiplier
        for setting, (vector, fit) in fitted.items():
            vector.save(entry_path("generations", keys[setting], ".vector.safetensors", name))
            atomic_write(fit_path[setting], lambda tmp: fit.to_csv(tmp, index=False))
            rows = grid[grid.setting == setting]
            atomic_write(gen_path[setting], lambda tmp: rows.to_csv(tmp, index=False))  # last: marks it done
    grids = [pd.read_csv(gen_path[s.name], keep_default_na=False) for s in settings]
    fits = [pd.read_csv(fit_path[s.name]) for s in settings]
    return pd.concat(grids, ignore_index=True), pd.concat(fits, ignore_index=True)


def control_seed(concept_class: str, concept: str, seed: int) -> int:
    """The random-direction control's seed for one concept: stable across runs, different per concept."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{concept_class}/{concept}".encode()).digest()[:4], "big")


def unsteered_answers(context: RunContext, concept_class: str, protocol: Protocol = ADOPTED) -> list[str]:
    """The model's greedy answers to a class's questions with no steering, under the protocol's system prompt
    (cached: every concept of the class shares them)."""
    questions = context.questions[concept_class]
    key = cache_key(
        "unsteered",
        PIPELINE_VERSION,
        model=context.model_name,
        dtype=str(next(context.model.parameters()).dtype),
        questions=list(questions),
        max_new_tokens=context.max_new_tokens,
        system=protocol.system,
        **decoding_inputs(context.stop_loops),
    )
    path = entry_path("generations", key, ".unsteered.csv", context.model_name)
    if not path.exists():
        answers = decoding.generate(
            context.model,
            context.tokenizer,
            questions,
            max_new_tokens=context.max_new_tokens,
            system=protocol.system,
            stop_loops=context.stop_loops,
        )
        table = pd.DataFrame({"question": questions, "response": answers})
        atomic_write(path, lambda tmp: table.to_csv(tmp, index=False))
    return pd.read_csv(path, keep_default_na=False).response.tolist()


def run_controls(
    context: RunContext,
    concept_class: str,
    concept: str,
    setting: str = OURS,
    coefficients=None,
    blocks=None,
    scale: float | None = None,
    protocol: Protocol = ADOPTED,
) -> pd.DataFrame:
    """Both negative controls of one concept's `setting` vector, one row per control × coefficient × question:
    CONTROL_RANDOM, a seeded random unit direction per block with the vector's norms, steered like the vector (same
    grid, `blocks` and `scale`, default the protocol's), and CONTROL_UNSTEERED, the unsteered answers (coefficient 0).
    The random direction's generations are cached per concept; `coefficients` defaults to the context's grid."""
    coefficients = context.coefficients if coefficients is None else coefficients
    default_blocks, multiplier = protocol.steered_blocks(len(steering.find_blocks(context.model)))
    blocks = default_blocks if blocks is None else [int(b) for b in blocks]
    scale = multiplier if scale is None else float(scale)
    key = cache_key(
        "controls",
        PIPELINE_VERSION,
        setting=setting,
        blocks=blocks,
        scale=scale,
        **steering_inputs(context, concept_class, concept, coefficients),
        **protocol.key_inputs(),
    )
    path = entry_path("generations", key, ".control.csv", context.model_name)
    if not path.exists():
        acts = context.activations(concept_class, concept, protocol)
        vector = fit_setting(acts, Setting.parse(setting), context.model_name, context.seed)[0]
        control = vector.random_like(control_seed(concept_class, concept, context.seed))
        grid = generate_grid(
            context.model,
            context.tokenizer,
            {CONTROL_RANDOM: control.scaled(protocol.scaling, default_blocks)},
            context.questions[concept_class],
            coefficients,
            blocks,
            context.max_new_tokens,
            {CONTROL_RANDOM: scale},
            protocol,
            context.stop_loops,
        )
        atomic_write(path, lambda tmp: grid.to_csv(tmp, index=False))
    questions = context.questions[concept_class]
    unsteered = pd.DataFrame(
        {
            GRID_LABEL: CONTROL_UNSTEERED,
            "coefficient": 0.0,
            "question_id": range(len(questions)),
            "question": questions,
            "response": unsteered_answers(context, concept_class, protocol),
        }
    )
    table = pd.concat([pd.read_csv(path, keep_default_na=False), unsteered], ignore_index=True)
    table.insert(0, "concept", concept)
    table.insert(0, "concept_class", concept_class)
    if protocol.changes():  # as `run_concept`'s tables
        table["protocol"] = protocol.name
        table["eps"] = table.coefficient * scale
    return table


def with_controls(
    context: RunContext, sample: pd.DataFrame, generations: pd.DataFrame, setting: str = OURS, **kwargs
) -> pd.DataFrame:
    """`generations` followed by `run_controls` of every concept of a sample (`setting` names the controls' vector)."""
    controls = for_each_concept(sample, lambda c, x: (run_controls(context, c, x, setting, **kwargs),), "controls")[0]
    return pd.concat([generations, controls], ignore_index=True)


def run_concepts(
    context: RunContext, sample: pd.DataFrame, settings: list[Setting], **kwargs
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`run_concept` for every concept of a sample: (generations, fits), concatenated."""
    return for_each_concept(sample, lambda c, x: run_concept(context, c, x, settings, **kwargs), "concepts")


def judged_run(
    context: RunContext, sample: pd.DataFrame, setting_names: list[str], grader, **kwargs
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`run_concepts` for named settings, then the judge: (scored generations, fits)."""
    generations, fits = run_concepts(context, sample, [Setting.parse(s) for s in setting_names], **kwargs)
    return judge.score_generations(grader, generations), fits


def statement_sweep(
    context: RunContext,
    sample: pd.DataFrame,
    all_statements: list[str],
    counts: tuple[int, ...],
    setting_names: list[str],
    grader,
    **kwargs,
) -> pd.DataFrame:
    """Scored generations for each training-set size (the first n of `all_statements`), with `n_statements`."""
    runs = [
        judged_run(replace(context, statements=all_statements[:n]), sample, setting_names, grader, **kwargs)[0]
        for n in counts
    ]
    return pd.concat([run.assign(n_statements=n) for run, n in zip(runs, counts)], ignore_index=True)


GRID_LABEL = "setting"  # the column of `generate_grid` (and of every cached grid) that names each row's arm


def grid_rows(
    vectors: dict[str, ConceptVector],
    coefficients: Sequence[float],
    n_questions: int,
    blocks: Sequence[int] | dict[str, Sequence[int]],
    scales: dict[str, float] | None = None,
) -> tuple[list[tuple[str, float, int]], dict[int, torch.Tensor]]:
    """A grid's rows (arm, coefficient, question index), arm-major, and their per-row additions
    (`steering_additions` at coefficient x the arm's `scales` entry, default 1, on the arm's `blocks`)."""
    scales = scales or {}
    rows = [(s, c, q) for s in vectors for c in coefficients for q in range(n_questions)]
    row_blocks = [blocks[s] for s, _, _ in rows] if isinstance(blocks, dict) else blocks
    eps = [c * scales.get(s, 1.0) for s, c, _ in rows]
    return rows, steering_additions([vectors[s] for s, _, _ in rows], eps, row_blocks)


def generate_grid(
    model: nn.Module,
    tokenizer,
    vectors: dict[str, ConceptVector],
    questions: Sequence[str],
    coefficients: Sequence[float],
    blocks: Sequence[int] | dict[str, Sequence[int]],
    max_new_tokens: int = 50,
    scales: dict[str, float] | None = None,
    protocol: Protocol = PAPER,
    stop_loops: bool = True,
) -> pd.DataFrame:
    """Every (arm, coefficient, question) of one concept in one `generate` call; one row each.

    An arm is a named vector, steered at `blocks` (one list, or a list per arm) with the coefficient grid
    multiplied by the arm's `scales` entry (default 1); `coefficient` is the grid value before scaling. The
    `protocol` gives the apply-time rest: its system prompt and positions (its blocks and scaling are in `blocks`,
    `scales` and the vectors, which differ per arm); `stop_loops` ends responses that loop (`decoding`).
    """
    rows, additions = grid_rows(vectors, coefficients, len(questions), blocks, scales)
    responses = generate(
        model,
        tokenizer,
        [questions[q] for _, _, q in rows],
        additions,
        max_new_tokens,
        system=protocol.system,
        positions=protocol.positions,
        stop_loops=stop_loops,
    )
    return pd.DataFrame(
        {
            GRID_LABEL: [s for s, _, _ in rows],
            "coefficient": [c for _, c, _ in rows],
            "question_id": [q for _, _, q in rows],
            "question": [questions[q] for _, _, q in rows],
            "response": responses,
        }
    )


def extract_cached(
    model: nn.Module,
    model_key: str,
    prompts: list[EncodedPrompt],
    n_tail: int,
    pad_id: int,
    batch_size: int = 16,
    keep_user_attention: bool = False,
    desc: str = "extract",
) -> Activations:
    """`extract`, cached on disk under a key of (model, dtype, prompt texts and spans, n_tail, code version)."""
    key = cache_key(
        "activations",
        EXTRACTION_VERSION,
        model=model_key,
        dtype=str(next(model.parameters()).dtype),
        prompts=[(p.text, p.prefix_span) for p in prompts],
        n_tail=n_tail,
        user_attention=keep_user_attention,
    )

    def compute() -> dict[str, torch.Tensor]:
        acts = extract(model, prompts, n_tail, pad_id, batch_size, keep_user_attention, desc=desc)
        return {k: v for k, v in vars(acts).items() if v is not None}

    tensors = cached_tensors("activations", key, compute)
    return Activations(hidden=tensors["hidden"], attn_prefix=tensors["attn_prefix"], attn_user=tensors.get("attn_user"))
