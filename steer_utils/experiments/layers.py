"""Notebook 03: which blocks to steer. An enrichment test per block, block sets built from its scores, and one
concept's vector steered through each set.

`concept_enrichment` scores each block by how often its heads attend to the concept prefix more than a null allows;
`block_sets` names the sets steered ('all', top/bottom-k, seeded random-k); `run_concept` steers one concept through
every set in one batched call (cached), `run_concepts` does it for a sample and applies the judge.
"""

from __future__ import annotations

from dataclasses import replace

import pandas as pd
import torch

from ..cache import atomic_write, cache_key, entry_path
from ..core import enrichment, prompting, training
from ..core.extraction import user_layout
from ..core.protocol import ADOPTED, Protocol, default_blocks
from ..core.training import OURS, ConceptActivations, Setting
from . import evaluation, judge, pipeline
from .pipeline import PIPELINE_VERSION, RunContext, fit_setting, for_each_concept, steering_inputs

FRACTIONS = (0.25, 0.5)  # shares of the steerable blocks kept by top/bottom/random-k selection
# The enrichment test's options and their defaults; they enter the cache key of `run_concept` (omitted and explicit
# defaults give one key).
ENRICHMENT_DEFAULTS = {"null": "scattered", "n_draws": 1000, "alpha": 0.01, "fdr_level": 0.05}


def concept_enrichment(
    acts: ConceptActivations,
    null: str = "scattered",
    n_draws: int = 1000,
    alpha: float = 0.01,
    fdr_level: float = 0.05,
    seed: int = 0,
) -> pd.DataFrame:
    """Per block: enrichment `score` (share of (statement, head) tests with p < alpha at the attention-selected
    token), `score_fdr` (share with Benjamini-Hochberg q < fdr_level over all the concept's tests), `evidence`
    (mean -log10 p, which breaks ties between equal scores) and the selected token."""
    chosen = training.select_tokens(acts.prefixed.attn_prefix_mean, "attention")  # (n_blocks,)
    rows = training.gather_selected(acts.prefixed.attn_user, chosen)  # (n, n_blocks, n_heads, W)
    pvalues = enrichment.permutation_pvalues(rows, acts.user_lengths, acts.prefix_spans, null, n_draws, seed)
    n_blocks = pvalues.shape[1]
    return pd.DataFrame(
        {
            "concept_class": acts.concept_class,
            "concept": acts.concept,
            "block": range(n_blocks),
            "depth": [b / max(n_blocks - 1, 1) for b in range(n_blocks)],  # 0 = first block, 1 = last
            "score": enrichment.enrichment_scores(pvalues, alpha).tolist(),
            "score_fdr": enrichment.enrichment_scores(pvalues, fdr_level, fdr=True).tolist(),
            "evidence": enrichment.evidence(pvalues).tolist(),
            "selected": chosen.tolist(),
            "selected_token": [acts.tail[i] for i in chosen.tolist()],
        }
    )


def enrichment_tables(
    context: RunContext, sample: pd.DataFrame, protocol: Protocol = ADOPTED, **kwargs
) -> pd.DataFrame:
    """`concept_enrichment` for every concept of a sample (activations come from the extraction cache). The test
    reads only the prefixed prompts (under the protocol's system prompt), so no contrast concept is extracted."""
    prefixed_only = replace(protocol, contrast=0)

    def enrichment(concept_class: str, concept: str) -> tuple[pd.DataFrame]:
        return (concept_enrichment(context.activations(concept_class, concept, prefixed_only), **kwargs),)

    return for_each_concept(sample, enrichment, "enrichment")[0]


def block_sets(
    scores: torch.Tensor, tiebreak: torch.Tensor, fractions=FRACTIONS, n_random: int = 3, seed: int = 0
) -> dict[str, list[int]]:
    """Named block sets to steer: 'all' steerable blocks, and per fraction f the top/bottom-k by enrichment score
    (ties by `tiebreak`) and `n_random` seeded random-k draws ('random-25%-d0', ...), k = round(f * #steerable)."""
    candidates = default_blocks(len(scores))
    sets = {"all": candidates}
    for fraction in fractions:
        k, label = enrichment.k_from_fraction(fraction, len(candidates)), f"{round(100 * fraction)}%"
        for how in ("top", "bottom"):
            sets[f"{how}-{label}"] = enrichment.select_blocks(scores, k, how, candidates=candidates, tiebreak=tiebreak)
        for draw in range(n_random):
            sets[f"random-{label}-d{draw}"] = enrichment.select_blocks(
                scores, k, "random", seed=seed + draw, candidates=candidates
            )
    return sets


def block_set_order(fractions=FRACTIONS) -> list[str]:
    """The block sets without the random draws' suffix, in plotting order: 'all', then top, random and bottom per
    fraction ('top-25%', 'random-25%', 'bottom-25%', ...)."""
    return ["all"] + [f"{how}-{round(100 * f)}%" for f in fractions for how in ("top", "random", "bottom")]


def block_set_pairs(fractions=FRACTIONS) -> list[tuple[str, str]]:
    """Notebook 03's paired tests, (other, top-k): bottom-k and random-k per fraction, then all blocks per fraction."""
    labels = [f"{round(100 * f)}%" for f in fractions]
    return [(f"{other}-{label}", f"top-{label}") for label in labels for other in ("bottom", "random")] + [
        ("all", f"top-{label}") for label in labels
    ]


def smallest_pvalues(
    tokenizer,
    concept_class: str,
    concept: str,
    statements: list[str],
    n_draws: int = 1000,
    protocol: Protocol = ADOPTED,
) -> pd.DataFrame:
    """The smallest p-value each null can reach for a concept's shortest user text and longest prefix (the prompts
    are only tokenised): one row per null."""
    prefixed, _ = prompting.paired_prompts(tokenizer, concept_class, concept, statements, protocol.system)
    user_lengths, prefix_spans = user_layout(prefixed)
    user_length, prefix_length = int(user_lengths.min()), int(prefix_spans.diff(dim=1).max())
    return pd.DataFrame(
        [
            {
                "null": null,
                "shortest_user_text": user_length,
                "longest_prefix": prefix_length,
                "smallest_p": enrichment.min_attainable_pvalue(user_length, prefix_length, null, n_draws),
            }
            for null in enrichment.NULLS
        ]
    )


def enriched_block_sets(
    acts: ConceptActivations, fractions=FRACTIONS, n_random: int = 3, seed: int = 0, **enrichment_kwargs
) -> tuple[pd.DataFrame, dict[str, list[int]], dict[str, float]]:
    """One concept's enrichment table, its `block_sets`, and each set's eps scale (#steerable / k), so every set
    injects about the same total shift into the residual stream as steering all blocks."""
    table = concept_enrichment(acts, seed=seed, **enrichment_kwargs)
    sets = block_sets(
        torch.tensor(table.score.to_numpy()), torch.tensor(table.evidence.to_numpy()), fractions, n_random, seed
    )
    return table, sets, {name: len(sets["all"]) / len(blocks) for name, blocks in sets.items()}


def run_concept(
    context: RunContext,
    concept_class: str,
    concept: str,
    setting: str = OURS,
    fractions=FRACTIONS,
    n_random: int = 3,
    coefficients=None,
    protocol: Protocol = ADOPTED,
    **enrichment_kwargs,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One concept's vector (trained and applied under `protocol`) steered through each block set of `block_sets`,
    in one batched call; cached.

    A set of k blocks gets the coefficient grid scaled by (#steerable / k), so every set injects about the
    same total shift into the residual stream as steering all blocks (`eps` column = the applied value).
    Returns (generations: one row per block set × coefficient × question, `block_set` naming the set with its
    draw suffix ('random-25%-d1') and `setting` the vector's; enrichment: one row per block). `coefficients`
    defaults to the context's grid.
    """
    coefficients = context.coefficients if coefficients is None else coefficients
    if not len(coefficients):
        raise ValueError("The coefficient grid is empty; give at least one coefficient.")
    if protocol.blocks != "all":
        raise ValueError(
            f"Layer selection chooses its own blocks; give a protocol with blocks='all', not {protocol.name!r}."
        )
    unknown = sorted(set(enrichment_kwargs) - set(ENRICHMENT_DEFAULTS))
    if unknown:
        raise TypeError(f"Unknown enrichment option(s) {unknown}; use {', '.join(ENRICHMENT_DEFAULTS)}.")
    enrichment_kwargs = {**ENRICHMENT_DEFAULTS, **enrichment_kwargs}  # omitted and explicit defaults: one key
    key = cache_key(
        "layers",
        PIPELINE_VERSION,
        setting=setting,
        fractions=list(fractions),
        n_random=n_random,
        **steering_inputs(context, concept_class, concept, coefficients),
        **enrichment_kwargs,
        **protocol.key_inputs(),
    )
    gen_path = entry_path("layers", key, ".csv", context.model_name)
    enrich_path = entry_path("layers", key, ".enrichment.csv", context.model_name)
    if not gen_path.exists():
        acts = context.activations(concept_class, concept, protocol)
        table, sets, scales = enriched_block_sets(acts, fractions, n_random, context.seed, **enrichment_kwargs)
        fitted = fit_setting(acts, Setting.parse(setting), context.model_name, context.seed)[0]
        vector = fitted.scaled(protocol.scaling, sets["all"])
        grid = pipeline.generate_grid(
            context.model,
            context.tokenizer,
            {name: vector for name in sets},
            context.questions[concept_class],
            coefficients,
            sets,
            context.max_new_tokens,
            scales,
            protocol,
            context.stop_loops,
        )
        grid.insert(0, "concept", concept)
        grid.insert(0, "concept_class", concept_class)
        drawn = grid[pipeline.GRID_LABEL]  # each row's block set, with its draw suffix
        grid.insert(3, "block_set", drawn.str.replace(evaluation.DRAW_SUFFIX, "", regex=True))
        grid.insert(4, "n_steered", drawn.map(lambda s: len(sets[s])))
        grid.insert(6, "eps", grid.coefficient * drawn.map(scales))
        grid["blocks"] = drawn.map(lambda s: " ".join(map(str, sets[s])))
        atomic_write(enrich_path, lambda tmp: table.to_csv(tmp, index=False))
        atomic_write(gen_path, lambda tmp: grid.to_csv(tmp, index=False))  # last: marks it done
    # The entry keeps the grid's own labels (GRID_LABEL = the drawn set's name, `block_set` = without the draw); the
    # table names the set `block_set` and gives `setting` its one meaning, the vector's setting.
    entry = pd.read_csv(gen_path, keep_default_na=False)
    generations = entry.drop(columns="block_set").rename(columns={pipeline.GRID_LABEL: "block_set"})
    generations.insert(3, "setting", setting)
    return generations, pd.read_csv(enrich_path)


def run_concepts(context: RunContext, sample: pd.DataFrame, grader, **kwargs) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`run_concept` for every concept of a sample, then the judge: (scored generations, enrichment)."""
    grids, tables = for_each_concept(sample, lambda c, x: run_concept(context, c, x, **kwargs), "layer selection")
    return judge.score_generations(grader, grids), tables


def top_block_table(enrichment_table: pd.DataFrame, fractions=FRACTIONS) -> pd.DataFrame:
    """The blocks of every concept's top-k sets (one row per concept × set × block), with normalised depth."""
    rows = []
    for (concept_class, concept), table in enrichment_table.groupby(["concept_class", "concept"], sort=False):
        sets = block_sets(
            torch.tensor(table.score.to_numpy()), torch.tensor(table.evidence.to_numpy()), fractions, n_random=0
        )
        rows += [
            (concept_class, concept, name, block, block / (len(table) - 1))
            for name, blocks in sets.items()
            if name.startswith("top")
            for block in blocks
        ]
    return pd.DataFrame(rows, columns=["concept_class", "concept", "block_set", "block", "depth"])
