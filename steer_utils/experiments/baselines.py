"""Baselines beside ours on the same concepts, questions, judge and coefficient protocol (notebook 05).

Methods (the `method` column of the generations; `setting` holds a vector method's `training.Setting`):
- `prompting`: the concept prefix in the user prompt, no steering (an upper bound, one coefficient);
- `mean_difference`: CAA-style, mean prefixed minus mean unprefixed hidden state at the last token;
- `prior`: fixed token + hard labels + RFM (notebook 01's `fixed-hard-rfm`);
- `ours`: attention-guided token + soft labels + RFM, steered through the block set chosen from notebook 03;
- `sadi-{head|hidden}-{last|all}`: SADI (`sadi.py`), faithful (last prompt token) and adapted (all positions).
Vector methods share the coefficient grid (`RunContext.coefficients`); a SADI variant's grid is a list of (K, delta)
points tuned on held-out concepts, as many as the coefficient grid has, with `coefficient` = the tuning rank
(1 = best). Every (concept, method) is cached like notebook 01's generations; a cached grid labels its rows in a
column named `setting` (`pipeline.GRID_LABEL`), which the tables rename to `method` or `variant`.
"""

from __future__ import annotations

import hashlib
import time

import pandas as pd
import torch

from .. import paths
from ..cache import atomic_write, cache_key, cached_tensors, entry_path
from ..core import decoding, prompting, training
from ..core.protocol import ADOPTED, Protocol, default_blocks
from . import data, layers, pipeline, profiles, sadi

BASELINES_VERSION = 1
VECTOR_METHODS = {"mean_difference": "fixed-hard-mean_difference", "prior": "fixed-hard-rfm"}
SADI_VARIANTS = {f"sadi-{site}-{where}": (site, where) for site in sadi.SITES for where in sadi.POSITIONS}
COMPARED_METHODS = ("prompting", *VECTOR_METHODS, "ours", *SADI_VARIANTS)
OURS_CANDIDATES = ("all", "top-25%", "top-50%")  # block sets of notebook 03 that `ours` may use


def ours_block_set(
    model_name: str,
    block_set: str = "auto",
    protocol: str = "held_out",
    candidates: tuple[str, ...] = OURS_CANDIDATES,
    variant: str = "",
) -> str:
    """The block set `ours` steers: `block_set` itself, or ("auto") the candidate with the highest overall
    steerability in notebook 03's table for this model and steering protocol (`variant`; ties: the first listed)."""
    if block_set != "auto":
        if block_set not in candidates:
            raise ValueError(
                f"Unknown block set '{block_set}' for ours; use 'auto' or one of: {', '.join(candidates)}."
            )
        return block_set
    path = paths.results_dir(model_name, variant=variant) / "03_steerability.csv"
    if not path.is_file():
        raise FileNotFoundError(
            f"'{path}' is missing; run notebook 03 for {model_name} first, or give block_set "
            f"as one of: {', '.join(candidates)}."
        )
    table = pd.read_csv(path)
    rows = table[(table.protocol == protocol) & (table.concept_class == "all")].set_index("block_set")
    rows = rows.reindex([c for c in candidates if c in rows.index])
    if rows.empty:
        raise ValueError(f"'{path}' has no rows for block sets {list(candidates)}; rerun notebook 03.")
    return str(rows.steerability.idxmax())


def tuning_concepts(n_reported: int, n_tuning: int, seed: int = 0) -> pd.DataFrame:
    """Held-out concepts for tuning SADI: per class, the `n_tuning` concepts of the seeded sample that follow the
    `n_reported` ones notebook 05 reports (disjoint from them by construction)."""
    if not isinstance(n_tuning, int) or isinstance(n_tuning, bool) or n_tuning < 1:
        raise ValueError(f"tune_concepts_per_class must be a positive integer, got {n_tuning!r}.")
    larger = data.sample_concepts(n_reported + n_tuning, seed=seed)
    reported = data.sample_concepts(n_reported, seed=seed)
    keys = ["concept_class", "concept"]
    held_out = larger.merge(reported[keys], on=keys, how="left", indicator=True)
    return held_out[held_out._merge == "left_only"].drop(columns="_merge").reset_index(drop=True)


def _cached_grid(name: str, key_inputs: dict, generate) -> pd.DataFrame:
    """Generations of one (concept, method) from cache/baselines/<model>/, or `generate()` them and cache."""
    key = cache_key("baselines", BASELINES_VERSION, method=name, **key_inputs)
    path = entry_path("baselines", key, ".csv", key_inputs["model"])
    if not path.exists():
        grid = generate()
        atomic_write(path, lambda tmp: grid.to_csv(tmp, index=False))
    return pd.read_csv(path, keep_default_na=False)


def _rows(concept_class: str, concept: str, label: str, coefficients, questions, responses, **extra) -> pd.DataFrame:
    rows = [(c, q) for c in coefficients for q in range(len(questions))]
    return pd.DataFrame(
        {
            "concept_class": concept_class,
            "concept": concept,
            pipeline.GRID_LABEL: label,
            "coefficient": [c for c, _ in rows],
            "question_id": [q for _, q in rows],
            "question": [questions[q] for _, q in rows],
            "response": responses,
            **{k: [v[i] for i, _ in enumerate(coefficients) for _ in questions] for k, v in extra.items()},
        }
    )


def prompting_grid(
    model,
    tokenizer,
    concept_class: str,
    concept: str,
    questions: list[str],
    max_new_tokens: int = 50,
    stop_loops: bool = True,
) -> pd.DataFrame:
    """Unsteered answers to the questions with the concept prefix in the user prompt (coefficient 0)."""
    prefix = prompting.prefix_text(concept_class, concept)
    messages = [f"{prefix} {q}" for q in questions]
    responses = decoding.generate(model, tokenizer, messages, None, max_new_tokens, stop_loops=stop_loops)
    return _rows(concept_class, concept, "prompting", [0.0], questions, responses)


def sadi_activations(
    model, tokenizer, model_name: str, user_messages: list[str], batch_size: int = 16
) -> dict[str, torch.Tensor]:
    """Last-token activations of every SADI site for a list of user messages, cached per model and messages
    (the unprefixed statements are recorded once per model and serve every concept)."""
    key = cache_key(
        "sadi",
        BASELINES_VERSION,
        model=model_name,
        dtype=str(next(model.parameters()).dtype),
        messages=hashlib.sha256("\n".join(user_messages).encode()).hexdigest(),
    )
    return cached_tensors(
        "sadi", key, lambda: sadi.record_last_token(model, tokenizer, user_messages, sadi.SITES, batch_size), model_name
    )


def sadi_masks(
    model, tokenizer, model_name: str, concept_class: str, concept: str, statements: list[str], ks: dict[str, list[int]]
) -> dict[str, dict[int, torch.Tensor]]:
    """SADI masks {site: {K: (n_blocks, n_elements) bool}} from the last-token activations of the paired training
    prompts (prefixed vs unprefixed), for the Ks wanted at each site."""
    prefixed, plain = (
        sadi_activations(model, tokenizer, model_name, messages)
        for messages in prompting.paired_messages(concept_class, concept, statements)
    )
    return {
        site: {k: sadi.sadi_mask(prefixed[site], plain[site], k) for k in sorted(set(site_ks))}
        for site, site_ks in ks.items()
    }


def sadi_grid(
    model,
    tokenizer,
    concept_class: str,
    concept: str,
    questions: list[str],
    variant: str,
    grid: list[tuple[int, float]],
    masks: dict[int, torch.Tensor],
    max_new_tokens: int = 50,
    stop_loops: bool = True,
) -> pd.DataFrame:
    """One SADI variant's (K, delta) grid × questions for one concept; `coefficient` = the point's rank."""
    site, where = SADI_VARIANTS[variant]
    rows = [(k, d, q) for k, d in grid for q in questions]
    responses = sadi.generate_sadi(
        model,
        tokenizer,
        [q for _, _, q in rows],
        [masks[k] for k, _, _ in rows],
        [d for _, d, _ in rows],
        site,
        where,
        max_new_tokens,
        stop_loops,
    )
    return _rows(
        concept_class,
        concept,
        variant,
        list(range(1, len(grid) + 1)),
        questions,
        responses,
        k=[k for k, _ in grid],
        delta=[d for _, d in grid],
    )


def _ks(grids: dict[str, list[tuple[int, float]]]) -> dict[str, list[int]]:
    """The Ks each site needs for these variants' grids."""
    ks: dict[str, list[int]] = {}
    for variant, grid in grids.items():
        ks.setdefault(SADI_VARIANTS[variant][0], []).extend(k for k, _ in grid)
    return ks


def tuning_grids(profile: profiles.Profile) -> dict[str, list[tuple[int, float]]]:
    """Every (K, delta) of a profile's SADI tuning grid, per variant."""
    ks = {"head": profile.sadi_head_ks, "hidden": profile.sadi_hidden_ks}
    return {v: [(k, float(d)) for k in ks[site] for d in profile.sadi_deltas] for v, (site, _) in SADI_VARIANTS.items()}


def run_sadi(
    context: pipeline.RunContext, sample: pd.DataFrame, grids: dict[str, list[tuple[int, float]]]
) -> pd.DataFrame:
    """`sadi_grid` for every concept of a sample and every variant in `grids` (cached per concept and variant), the
    variant in column `variant`."""
    model, tokenizer = context.model, context.tokenizer

    def concept_grids(concept_class: str, concept: str) -> tuple[pd.DataFrame]:
        inputs = pipeline.steering_inputs(context, concept_class, concept, [])
        masks: dict[str, dict[int, torch.Tensor]] = {}  # built once per concept, and only if a grid is not cached

        def site_masks(site: str) -> dict[int, torch.Tensor]:
            if not masks:
                masks.update(
                    sadi_masks(
                        model, tokenizer, context.model_name, concept_class, concept, context.statements, _ks(grids)
                    )
                )
            return masks[site]

        def generate(variant: str, grid: list[tuple[int, float]]) -> pd.DataFrame:
            masks_of_site = site_masks(SADI_VARIANTS[variant][0])
            questions = context.questions[concept_class]
            return sadi_grid(
                model,
                tokenizer,
                concept_class,
                concept,
                questions,
                variant,
                grid,
                masks_of_site,
                context.max_new_tokens,
                context.stop_loops,
            )

        variant_grids = [
            _cached_grid(variant, inputs | dict(settings=grid), lambda: generate(variant, grid))  # key input name kept
            for variant, grid in grids.items()
        ]
        return (pd.concat(variant_grids, ignore_index=True),)

    return pipeline.for_each_concept(sample, concept_grids, "SADI")[0].rename(columns={pipeline.GRID_LABEL: "variant"})


def best_sadi_grids(
    scored: pd.DataFrame, n_points: int = len(pipeline.COEFFICIENTS)
) -> dict[str, list[tuple[int, float]]]:
    """Per variant, the `n_points` (K, delta) with the highest mean judge score on the tuning concepts
    (ties: smaller delta, then smaller K), best first."""
    means = scored.groupby(["variant", "k", "delta"]).score.mean().rename("mean").reset_index()
    means = means.sort_values(["variant", "mean", "delta", "k"], ascending=[True, False, True, True], kind="stable")
    ranked = {
        v: [(int(k), float(d)) for k, d in zip(rows.k, rows.delta)][:n_points]
        for v, rows in means.groupby("variant", sort=False)
    }
    return {v: ranked[v] for v in SADI_VARIANTS if v in ranked}


def tuning_table(scored: pd.DataFrame, chosen: dict[str, list[tuple[int, float]]]) -> pd.DataFrame:
    """Mean tuning score per variant and (K, delta), with the eval rank of the chosen points (0 = not chosen)."""
    table = scored.groupby(["variant", "k", "delta"]).score.mean().rename("mean_score").reset_index()
    rank = {(v, k, d): i + 1 for v, grid in chosen.items() for i, (k, d) in enumerate(grid)}
    table["eval_rank"] = [rank.get((v, k, d), 0) for v, k, d in zip(table.variant, table.k, table.delta)]
    return table


def baseline_generations(
    context: pipeline.RunContext,
    sample: pd.DataFrame,
    block_set: str,
    sadi_grids: dict[str, list[tuple[int, float]]],
    protocol: Protocol = ADOPTED,
) -> pd.DataFrame:
    """Every method's generations for a sample, in COMPARED_METHODS order: the `method` column names it, `setting`
    the vector's `training.Setting` (empty for prompting and SADI, which fit none); the vector methods are trained
    and applied under `protocol`."""

    def concept_methods(concept_class: str, concept: str) -> tuple[pd.DataFrame]:
        questions = context.questions[concept_class]
        prompted = _cached_grid(
            "prompting",
            pipeline.steering_inputs(context, concept_class, concept, [0.0]),
            lambda: prompting_grid(
                context.model,
                context.tokenizer,
                concept_class,
                concept,
                questions,
                context.max_new_tokens,
                context.stop_loops,
            ),
        )
        settings = [training.Setting.parse(s) for s in VECTOR_METHODS.values()]
        vectors, _ = pipeline.run_concept(context, concept_class, concept, settings, protocol=protocol)
        vectors.insert(2, "method", vectors.setting.map({v: k for k, v in VECTOR_METHODS.items()}))
        ours, _ = layers.run_concept(context, concept_class, concept, protocol=protocol)
        ours = ours[ours.block_set == block_set]
        ours.insert(2, "method", "ours")
        return (
            pd.concat([prompted.rename(columns={pipeline.GRID_LABEL: "method"}), vectors, ours], ignore_index=True),
        )

    methods = pipeline.for_each_concept(sample, concept_methods, "baselines")[0]
    sadi_table = run_sadi(context, sample, sadi_grids).rename(columns={"variant": "method"})
    table = pd.concat([methods, sadi_table], ignore_index=True).fillna({"setting": ""})
    table["method"] = pd.Categorical(table.method, categories=list(COMPARED_METHODS), ordered=True)
    return table.sort_values("method", kind="stable").astype({"method": str}).reset_index(drop=True)  # sample order


def with_controls(
    context: pipeline.RunContext, generations: pd.DataFrame, protocol: Protocol = ADOPTED
) -> pd.DataFrame:
    """`generations` (`baseline_generations`) followed by the negative controls of ours for each of its concepts
    (`pipeline.run_controls`: a random direction at the blocks and scale ours steered there, and the unsteered
    answers); `method` names the control."""
    parts = [generations]
    for (concept_class, concept), rows in generations[generations.method == "ours"].groupby(
        ["concept_class", "concept"], sort=False
    ):
        first = rows.iloc[0]
        # `blocks` is "2 3 14" (read back as a number when one block is steered: 2, or 2.0 beside NaN rows)
        blocks, scale = [int(float(b)) for b in str(first.blocks).split()], float(first.eps) / float(first.coefficient)
        controls = pipeline.run_controls(context, concept_class, concept, first.setting, None, blocks, scale, protocol)
        steered = controls.setting == pipeline.CONTROL_RANDOM
        parts.append(
            controls.assign(
                method=controls.setting,
                eps=controls.coefficient * scale,
                block_set=first.block_set,
                n_steered=len(blocks) * steered,
                blocks=first.blocks,
            )
        )
    return pd.concat(parts, ignore_index=True)


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def cost_table(
    context: pipeline.RunContext,
    concept_class: str,
    concept: str,
    block_set: str,
    sadi_grids: dict[str, list[tuple[int, float]]],
    protocol: Protocol = ADOPTED,
) -> pd.DataFrame:
    """Wall seconds per method for one concept, nothing cached: activations, fit, and generating its grid alone."""
    model, tokenizer, model_name, statements = context.model, context.tokenizer, context.model_name, context.statements
    questions, max_new_tokens, seed = context.questions[concept_class], context.max_new_tokens, context.seed
    loops = context.stop_loops
    acts, extract_s = _timed(
        lambda: pipeline.concept_activations(
            model, tokenizer, model_name, concept_class, concept, statements, cached=False, protocol=protocol
        )
    )
    coefficients = list(context.coefficients)
    rows = [
        {
            "method": "prompting",
            "extract_s": 0.0,
            "fit_s": 0.0,
            "n_generations": len(questions),
            "generate_s": _timed(
                lambda: prompting_grid(model, tokenizer, concept_class, concept, questions, max_new_tokens, loops)
            )[1],
        }
    ]
    for method, setting in (*VECTOR_METHODS.items(), ("ours", training.OURS)):
        blocks = default_blocks(acts.prefixed.hidden.shape[1])
        scale = 1.0
        fit_start = time.perf_counter()
        if method == "ours" and block_set != "all":
            _, sets, scales = layers.enriched_block_sets(acts, n_random=0, seed=seed)
            blocks, scale = sets[block_set], scales[block_set]
        vector, _ = pipeline.fit_setting(acts, training.Setting.parse(setting), model_name, seed)
        fit_s = time.perf_counter() - fit_start
        generate_s = _timed(
            lambda: pipeline.generate_grid(
                model,
                tokenizer,
                {method: vector},
                questions,
                coefficients,
                blocks,
                max_new_tokens,
                {method: scale},
                protocol,
                loops,
            )
        )[1]
        rows.append(
            {
                "method": method,
                "extract_s": extract_s,
                "fit_s": fit_s,
                "n_generations": len(coefficients) * len(questions),
                "generate_s": generate_s,
            }
        )
    messages = dict(zip(("prefixed", "plain"), prompting.paired_messages(concept_class, concept, statements)))
    recorded, record_s = _timed(lambda: {k: sadi.record_last_token(model, tokenizer, m) for k, m in messages.items()})
    for variant, grid in sadi_grids.items():
        site = SADI_VARIANTS[variant][0]
        masks, mask_s = _timed(
            lambda: {k: sadi.sadi_mask(recorded["prefixed"][site], recorded["plain"][site], k) for k, _ in grid}
        )
        generate_s = _timed(
            lambda: sadi_grid(
                model, tokenizer, concept_class, concept, questions, variant, grid, masks, max_new_tokens, loops
            )
        )[1]
        rows.append(
            {
                "method": variant,
                "extract_s": record_s,
                "fit_s": mask_s,
                "n_generations": len(grid) * len(questions),
                "generate_s": generate_s,
            }
        )
    table = pd.DataFrame(rows)
    table["total_s"] = table.extract_s + table.fit_s + table.generate_s
    return table.round(3)
