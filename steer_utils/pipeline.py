"""One concept end to end: prompts -> activations -> token selection -> labels -> vectors -> steered generations.

A *setting* names the three choices the paper ablates: token selection, labels and vector method
(e.g. `attention-soft-rfm`). Activations are cached per prompt set (the unprefixed ones once per
model and statement set); each concept's generations are cached too, so an interrupted run resumes.
"""
from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass, replace

import pandas as pd
import torch
from tqdm.auto import tqdm

from . import data, enrichment, evaluation, extraction, labels, selection, steering, vectors
from .cache import atomic_write, cache_key, upstream_versions
from .extraction import Activations, extract_cached, user_layout
from .paths import CACHE_DIR, model_slug
from .protocol import ADOPTED, PAPER, Protocol

# Bump when token selection, labels, vector fitting, enrichment or steered generation change their results;
# every generations/layers/baselines entry is then recomputed. 2: generation with SDPA attention.
PIPELINE_VERSION = 2
COEFFICIENTS = (0.015, 0.025, 0.035, 0.05)  # eps relative to each block's typical hidden-state norm
LAYER_FRACTIONS = (0.25, 0.5)  # shares of the steerable blocks kept by top/bottom/random-k selection


@dataclass(frozen=True)
class Setting:
    """Token selection × labels × vector method."""

    selection: str
    labels: str
    method: str = "rfm"

    @property
    def name(self) -> str:
        """e.g. 'attention-soft-rfm'."""
        return f"{self.selection}-{self.labels}-{self.method}"

    @classmethod
    def parse(cls, name: str) -> "Setting":
        """Inverse of `name`; checks each part."""
        parts = name.split("-")
        if len(parts) != 3 or parts[0] not in selection.METHODS or parts[1] not in labels.METHODS \
                or parts[2] not in vectors.METHODS:
            raise ValueError(f"Bad setting '{name}'; write <{'|'.join(selection.METHODS)}>-<{'|'.join(labels.METHODS)}>-"
                             f"<{'|'.join(vectors.METHODS)}>, e.g. attention-soft-rfm.")
        return cls(*parts)


@dataclass
class ConceptActivations:
    """Prefixed and unprefixed activations of one concept, and the shared tail."""

    concept_class: str
    concept: str
    prefixed: Activations
    unprefixed: Activations
    tail: list[str]
    user_lengths: torch.Tensor  # (n,) user-text tokens of each prefixed prompt
    prefix_spans: torch.Tensor  # (n, 2) the prefix span within the user text
    contrast: Activations | None = None  # (k n, ...) prefixed prompts of k other concepts of the class; None: k = 0


def training_prompts(tokenizer, concept_class: str, concept: str, statements: list[str],
                     protocol: Protocol = ADOPTED) -> tuple[list, list, list]:
    """(prefixed, unprefixed, contrast) EncodedPrompts a concept's vector is trained on under `protocol`: the paired
    prompts with its system prompt, and the prefixed prompts of its `protocol.contrast` neighbour concepts."""
    prefixed, plain = data.paired_prompts(tokenizer, concept_class, concept, statements, protocol.system)
    contrast = [p for other in data.neighbour_concepts(concept_class, concept, protocol.contrast) if protocol.contrast
                for p in data.paired_prompts(tokenizer, concept_class, other, statements, protocol.system)[0]]
    return prefixed, plain, contrast


def concept_activations(model, tokenizer, model_key: str, concept_class: str, concept: str,
                        statements: list[str], batch_size: int = 16, cached: bool = True,
                        protocol: Protocol = ADOPTED) -> ConceptActivations:
    """Extract the activations of the paired prompts of one concept (from the disk cache unless `cached=False`),
    with the protocol's system prompt, and of its contrast concepts' prefixed prompts when `protocol.contrast`."""
    prefixed, plain, others = training_prompts(tokenizer, concept_class, concept, statements, protocol)
    tail_ids = data.shared_tail(prefixed + plain + others)
    n_tail, pad = len(tail_ids), tokenizer.pad_token_id

    def run(prompts, **kwargs) -> Activations:
        if cached:
            return extract_cached(model, model_key, prompts, n_tail, pad, batch_size, **kwargs)
        return extraction.extract(model, prompts, n_tail, pad, batch_size, **kwargs)

    return ConceptActivations(
        concept_class, concept,
        run(prefixed, keep_user_attention=True, desc=f"extract {concept}"),
        run(plain, desc="extract unprefixed"),
        data.tail_token_names(tokenizer, tail_ids),
        *user_layout(prefixed),
        run(others, desc="extract contrast") if others else None,
    )


def training_set(acts: ConceptActivations, setting: Setting) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(features (m, n_blocks, d), labels (m, n_blocks), is_prefixed (m,), selected tail index per block).

    Rows: the n prefixed prompts (the positives, `is_prefixed`), the n unprefixed ones, then any contrast concepts'
    k n prefixed prompts, all read at this concept's selected token of each block; m = (2 + k) n; negatives get 0.
    """
    attn = acts.prefixed.attn_prefix_mean  # (n, n_blocks, n_tail)
    chosen = selection.select_tokens(attn, setting.selection)
    negatives = [acts.unprefixed.hidden] + ([acts.contrast.hidden] if acts.contrast is not None else [])
    features = torch.cat([selection.gather_selected(h, chosen) for h in [acts.prefixed.hidden, *negatives]])
    y = labels.make_labels(setting.labels, selection.gather_selected(attn, chosen), len(features) - len(attn),
                           concept=f"{acts.concept_class}/{acts.concept}")
    is_prefixed = torch.arange(len(features)) < len(acts.prefixed.hidden)
    return features, y, is_prefixed, chosen


def fit_setting(acts: ConceptActivations, setting: Setting, model_name: str, seed: int = 0) -> tuple[vectors.ConceptVector, pd.DataFrame]:
    """Concept vector of one setting, and a per-block table of the selected token and fit details."""
    features, y, is_prefixed, chosen = training_set(acts, setting)
    norms = vectors.block_norms(acts.unprefixed.hidden)
    meta = {"model": model_name, "concept_class": acts.concept_class, "concept": acts.concept,
            "token_selection": setting.selection, "labels": setting.labels, "setting": setting.name}
    vector, details = vectors.fit_concept_vector(setting.method, features, y, is_prefixed, norms, meta, seed=seed)
    table = pd.DataFrame(details).assign(
        concept_class=acts.concept_class, concept=acts.concept, setting=setting.name,
        selected=chosen.tolist(), selected_token=[acts.tail[i] for i in chosen.tolist()])
    return vector, table


def _run_inputs(model, model_name: str, concept_class: str, concept: str, statements: list[str], questions: list[str],
                coefficients, max_new_tokens: int, seed: int) -> dict:
    """What a concept's steered generations depend on, for their cache keys (also of notebook 05's baselines).

    Includes the code versions of the stages they build on (activations; for the baselines also this module's
    generation code), so bumping EXTRACTION_VERSION or PIPELINE_VERSION never reuses generations made from the
    old activations or code. Those versions enter the key only once they differ from the ones the existing
    cache entries were made with (see `cache.upstream_versions`), so adding them did not invalidate the cache.
    """
    return dict(model=model_name, dtype=str(next(model.parameters()).dtype), concept=[concept_class, concept],
                statements=hashlib.sha256("\n".join(statements).encode()).hexdigest(), questions=list(questions),
                coefficients=list(coefficients), max_new_tokens=max_new_tokens, seed=seed,
                **upstream_versions({"extraction": extraction.EXTRACTION_VERSION, "pipeline": PIPELINE_VERSION},
                                    written_with={"extraction": 2, "pipeline": 2}))


def generation_keys(model, model_name: str, concept_class: str, concept: str, statements: list[str],
                    questions: list[str], settings: list[Setting], coefficients=COEFFICIENTS, blocks=None,
                    max_new_tokens: int = 50, seed: int = 0, protocol: Protocol = ADOPTED) -> dict[str, str]:
    """The cache key of each setting's generations for one concept (`run_concept`'s entries), by setting name.

    The protocol enters the key only where it differs from the paper's, so the paper protocol's keys are unchanged.
    """
    blocks = protocol.steered_blocks(len(steering.find_blocks(model)))[0] if blocks is None else list(blocks)
    common = _run_inputs(model, model_name, concept_class, concept, statements, questions, coefficients,
                         max_new_tokens, seed) | dict(blocks=blocks)
    common |= protocol.key_inputs()
    return {s.name: cache_key("generations", PIPELINE_VERSION, setting=s.name, **common) for s in settings}


def run_concept(model, tokenizer, model_name: str, concept_class: str, concept: str, statements: list[str],
                questions: list[str], settings: list[Setting], coefficients=COEFFICIENTS, blocks=None,
                max_new_tokens: int = 50, seed: int = 0, batch_size: int = 16,
                protocol: Protocol = ADOPTED) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Fit every setting for one concept and generate its coefficient × question grid under `protocol`.

    Each (concept, setting) is cached on its own (generations, fit table and the concept vector as
    safetensors with its metadata), so notebooks that share a setting share its generations; the
    settings not cached yet are generated together in one batched call. `blocks` (default: the protocol's)
    overrides the steered blocks; the protocol's eps multiplier applies either way (`eps` column).
    Returns (generations: one row per setting × coefficient × question, fits: one row per setting × block).
    """
    if not len(coefficients):
        raise ValueError("The coefficient grid is empty; give at least one coefficient.")
    keys = generation_keys(model, model_name, concept_class, concept, statements, questions, settings, coefficients,
                           blocks, max_new_tokens, seed, protocol)
    default_blocks, multiplier = protocol.steered_blocks(len(steering.find_blocks(model)))
    blocks = default_blocks if blocks is None else list(blocks)
    folder = CACHE_DIR / "generations" / model_slug(model_name)
    gen_path = {name: folder / f"{key}.csv" for name, key in keys.items()}
    fit_path = {name: folder / f"{key}.fits.csv" for name, key in keys.items()}
    missing = [s for s in settings if not gen_path[s.name].exists()]
    if missing:
        acts = concept_activations(model, tokenizer, model_name, concept_class, concept, statements, batch_size,
                                   protocol=protocol)
        fitted = {s.name: fit_setting(acts, s, model_name, seed) for s in missing}
        grid = steering.generate_grid(model, tokenizer, {k: protocol.scaled(v, blocks) for k, (v, _) in fitted.items()},
                                      questions, coefficients, blocks, max_new_tokens,
                                      {k: multiplier for k in fitted}, protocol.system, protocol.positions)
        grid.insert(0, "concept", concept)
        grid.insert(0, "concept_class", concept_class)
        if protocol.changes():  # the paper protocol's tables keep their columns
            grid["protocol"] = protocol.name
            grid["eps"] = grid.coefficient * multiplier
        for name, (vector, fit) in fitted.items():
            vector.save(folder / f"{keys[name]}.vector.safetensors")
            atomic_write(fit_path[name], lambda tmp: fit.to_csv(tmp, index=False))
            rows = grid[grid.setting == name]
            atomic_write(gen_path[name], lambda tmp: rows.to_csv(tmp, index=False))  # last: marks it done
    grids = [pd.read_csv(gen_path[s.name], keep_default_na=False) for s in settings]
    fits = [pd.read_csv(fit_path[s.name]) for s in settings]
    return pd.concat(grids, ignore_index=True), pd.concat(fits, ignore_index=True)


def run_concepts(model, tokenizer, model_name: str, sample: pd.DataFrame, statements: list[str],
                 questions: dict[str, list[str]], settings: list[Setting], **kwargs) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`run_concept` for every row of a concept sample; concatenated generations and fits."""
    grids, fits = [], []
    for row in tqdm(list(sample.itertuples()), desc="concepts"):
        grid, fit = run_concept(model, tokenizer, model_name, row.concept_class, row.concept, statements,
                                questions[row.concept_class], settings, **kwargs)
        grids.append(grid)
        fits.append(fit)
    return pd.concat(grids, ignore_index=True), pd.concat(fits, ignore_index=True)


def judge_generations(judge, generations: pd.DataFrame) -> pd.DataFrame:
    """Generations with the judge's parts and 0/1 `score` appended, scored class by class."""
    parts = []
    for concept_class, rows in generations.groupby("concept_class", sort=False):
        table = judge.score_table(concept_class, rows.concept.tolist(), rows.question.tolist(), rows.response.tolist())
        parts.append(table.drop(columns=[c for c in table.columns if c in rows.columns]).set_index(rows.index))
    return generations.join(pd.concat(parts)).astype({"score": int})


def example_generations(scored: pd.DataFrame, per_class: int = 1, question_id: int = 0) -> pd.DataFrame:
    """Side-by-side responses to one question: per concept and setting, the first scoring coefficient's
    response (or the smallest coefficient's when none scored), written as '[eps=c, score=s] text'."""
    concepts = scored.drop_duplicates("concept").groupby("concept_class", sort=False).head(per_class).concept
    rows = scored[scored.concept.isin(concepts) & (scored.question_id == question_id)]
    rows = rows.sort_values(["score", "coefficient"], ascending=[False, True], kind="stable")
    picked = rows.groupby(["concept_class", "concept", "setting"], sort=False).head(1)
    text = [f"[eps={c:g}, score={s}] {r}" for c, s, r in zip(picked.coefficient, picked.score, picked.response)]
    wide = picked.assign(example=text).pivot(index=["concept_class", "concept"], columns="setting", values="example")
    return wide[list(dict.fromkeys(scored.setting))].reset_index()


def steering_strip(scored: pd.DataFrame, setting: str, concepts: list[str], question_id: int = 0) -> pd.DataFrame:
    """What steering does as eps grows: for each concept, the response to one question at every coefficient of
    one setting, with the judge's score and reason (one row per concept × coefficient, coefficients ascending)."""
    rows = scored[(scored.setting == setting) & scored.concept.isin(concepts) & (scored.question_id == question_id)]
    missing = sorted(set(concepts) - set(rows.concept))
    if missing:
        raise ValueError(f"No generations of setting {setting!r} for concept(s) {missing} at question {question_id}.")
    order = {c: i for i, c in enumerate(concepts)}
    return (rows.sort_values(["concept", "coefficient"], key=lambda c: c.map(order) if c.name == "concept" else c)
            [["concept_class", "concept", "coefficient", "score", "reason", "response"]].reset_index(drop=True))


def judged_run(model, tokenizer, model_name: str, sample: pd.DataFrame, statements: list[str],
               questions: dict[str, list[str]], setting_names: list[str], grader, **kwargs) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`run_concepts` for named settings, then the judge: (scored generations, fits)."""
    generations, fits = run_concepts(model, tokenizer, model_name, sample, statements, questions,
                                     [Setting.parse(s) for s in setting_names], **kwargs)
    return judge_generations(grader, generations), fits


def statement_sweep(model, tokenizer, model_name: str, sample: pd.DataFrame, all_statements: list[str],
                    counts: tuple[int, ...], questions: dict[str, list[str]], setting_names: list[str], grader,
                    **kwargs) -> pd.DataFrame:
    """Scored generations for each training-set size (the first n statements), with an `n_statements` column."""
    runs = [judged_run(model, tokenizer, model_name, sample, all_statements[:n], questions, setting_names, grader,
                       **kwargs)[0].assign(n_statements=n) for n in counts]
    return pd.concat(runs, ignore_index=True)


def concept_enrichment(acts: ConceptActivations, null: str = "scattered", n_draws: int = 1000, alpha: float = 0.01,
                       fdr_level: float = 0.05, seed: int = 0) -> pd.DataFrame:
    """Per block: enrichment `score` (share of (statement, head) tests with p < alpha at the attention-selected
    token), `score_fdr` (share with Benjamini-Hochberg q < fdr_level over all the concept's tests), `evidence`
    (mean -log10 p, which breaks ties between equal scores) and the selected token."""
    chosen = selection.select_tokens(acts.prefixed.attn_prefix_mean, "attention")  # (n_blocks,)
    rows = selection.gather_selected(acts.prefixed.attn_user, chosen)  # (n, n_blocks, n_heads, W)
    pvalues = enrichment.permutation_pvalues(rows, acts.user_lengths, acts.prefix_spans, null, n_draws, seed)
    n_blocks = pvalues.shape[1]
    return pd.DataFrame({
        "concept_class": acts.concept_class, "concept": acts.concept, "block": range(n_blocks),
        "depth": [b / max(n_blocks - 1, 1) for b in range(n_blocks)],  # 0 = first block, 1 = last
        "score": enrichment.enrichment_scores(pvalues, alpha).tolist(),
        "score_fdr": enrichment.enrichment_scores(pvalues, fdr_level, fdr=True).tolist(),
        "evidence": enrichment.evidence(pvalues).tolist(),
        "selected": chosen.tolist(), "selected_token": [acts.tail[i] for i in chosen.tolist()]})


def enrichment_tables(model, tokenizer, model_name: str, sample: pd.DataFrame, statements: list[str],
                      batch_size: int = 16, protocol: Protocol = ADOPTED, **kwargs) -> pd.DataFrame:
    """`concept_enrichment` for every concept of a sample (activations come from the extraction cache). The test
    reads only the prefixed prompts (under the protocol's system prompt), so no contrast concept is extracted."""
    prefixed_only = replace(protocol, contrast=0)
    tables = [concept_enrichment(concept_activations(model, tokenizer, model_name, row.concept_class, row.concept,
                                                     statements, batch_size, protocol=prefixed_only), **kwargs)
              for row in tqdm(list(sample.itertuples()), desc="enrichment")]
    return pd.concat(tables, ignore_index=True)


def block_sets(scores: torch.Tensor, tiebreak: torch.Tensor, fractions=LAYER_FRACTIONS, n_random: int = 3,
               seed: int = 0) -> dict[str, list[int]]:
    """Named block sets to steer: 'all' steerable blocks, and per fraction f the top/bottom-k by enrichment
    score (ties by `tiebreak`) and `n_random` seeded random-k draws ('random-25%-d0', ...), k = round(f * #steerable)."""
    candidates = steering.default_blocks(len(scores))
    sets = {"all": candidates}
    for fraction in fractions:
        k, label = enrichment.k_from_fraction(fraction, len(candidates)), f"{round(100 * fraction)}%"
        for how in ("top", "bottom"):
            sets[f"{how}-{label}"] = enrichment.select_blocks(scores, k, how, candidates=candidates, tiebreak=tiebreak)
        for draw in range(n_random):
            sets[f"random-{label}-d{draw}"] = enrichment.select_blocks(scores, k, "random", seed=seed + draw,
                                                                      candidates=candidates)
    return sets


def enriched_block_sets(acts: ConceptActivations, fractions=LAYER_FRACTIONS, n_random: int = 3, seed: int = 0,
                        **enrichment_kwargs) -> tuple[pd.DataFrame, dict[str, list[int]], dict[str, float]]:
    """One concept's enrichment table, its `block_sets`, and each set's eps scale (#steerable / k), so every set
    injects about the same total shift into the residual stream as steering all blocks."""
    table = concept_enrichment(acts, seed=seed, **enrichment_kwargs)
    sets = block_sets(torch.tensor(table.score.to_numpy()), torch.tensor(table.evidence.to_numpy()), fractions,
                      n_random, seed)
    return table, sets, {name: len(sets["all"]) / len(blocks) for name, blocks in sets.items()}


def _enrichment_defaults() -> dict:
    """`concept_enrichment`'s keyword defaults (null, n_draws, alpha, fdr_level), for cache keys."""
    params = inspect.signature(concept_enrichment).parameters
    return {name: p.default for name, p in params.items() if name not in ("acts", "seed")}


def run_layer_selection(model, tokenizer, model_name: str, concept_class: str, concept: str, statements: list[str],
                        questions: list[str], setting: str = "attention-soft-rfm", fractions=LAYER_FRACTIONS,
                        n_random: int = 3, coefficients=COEFFICIENTS, max_new_tokens: int = 50, seed: int = 0,
                        batch_size: int = 16, protocol: Protocol = ADOPTED,
                        **enrichment_kwargs) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One concept's vector (trained and applied under `protocol`) steered through each block set of `block_sets`,
    in one batched call; cached.

    A set of k blocks gets the coefficient grid scaled by (#steerable / k), so every set injects about the
    same total shift into the residual stream as steering all blocks (`eps` column = the applied value).
    Returns (generations: one row per block set × coefficient × question, enrichment: one row per block).
    """
    if not len(coefficients):
        raise ValueError("The coefficient grid is empty; give at least one coefficient.")
    if protocol.blocks != "all":
        raise ValueError(f"Layer selection chooses its own blocks; give a protocol with blocks='all', not "
                         f"{protocol.name!r}.")
    enrichment_kwargs = {**_enrichment_defaults(), **enrichment_kwargs}  # omitted and explicit defaults: one key
    key = cache_key("layers", PIPELINE_VERSION, setting=setting, fractions=list(fractions), n_random=n_random,
                    **_run_inputs(model, model_name, concept_class, concept, statements, questions, coefficients,
                                  max_new_tokens, seed), **enrichment_kwargs,
                    **protocol.key_inputs())
    folder = CACHE_DIR / "layers" / model_slug(model_name)
    gen_path, enrich_path = folder / f"{key}.csv", folder / f"{key}.enrichment.csv"
    if not gen_path.exists():
        acts = concept_activations(model, tokenizer, model_name, concept_class, concept, statements, batch_size,
                                   protocol=protocol)
        table, sets, scales = enriched_block_sets(acts, fractions, n_random, seed, **enrichment_kwargs)
        vector = protocol.scaled(fit_setting(acts, Setting.parse(setting), model_name, seed)[0], sets["all"])
        grid = steering.generate_grid(model, tokenizer, {name: vector for name in sets}, questions, coefficients,
                                      sets, max_new_tokens, scales, protocol.system, protocol.positions)
        grid.insert(0, "concept", concept)
        grid.insert(0, "concept_class", concept_class)
        grid.insert(3, "block_set", grid.setting.str.replace(evaluation.DRAW_SUFFIX, "", regex=True))
        grid.insert(4, "n_steered", grid.setting.map(lambda s: len(sets[s])))
        grid.insert(6, "eps", grid.coefficient * grid.setting.map(scales))
        grid["blocks"] = grid.setting.map(lambda s: " ".join(map(str, sets[s])))
        atomic_write(enrich_path, lambda tmp: table.to_csv(tmp, index=False))
        atomic_write(gen_path, lambda tmp: grid.to_csv(tmp, index=False))  # last: marks it done
    return pd.read_csv(gen_path, keep_default_na=False), pd.read_csv(enrich_path)


def layer_selection_run(model, tokenizer, model_name: str, sample: pd.DataFrame, statements: list[str],
                        questions: dict[str, list[str]], grader, **kwargs) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`run_layer_selection` for every concept of a sample, then the judge: (scored generations, enrichment)."""
    grids, tables = [], []
    for row in tqdm(list(sample.itertuples()), desc="layer selection"):
        grid, table = run_layer_selection(model, tokenizer, model_name, row.concept_class, row.concept, statements,
                                          questions[row.concept_class], **kwargs)
        grids.append(grid)
        tables.append(table)
    return judge_generations(grader, pd.concat(grids, ignore_index=True)), pd.concat(tables, ignore_index=True)


def top_block_table(enrichment_table: pd.DataFrame, fractions=LAYER_FRACTIONS) -> pd.DataFrame:
    """The blocks of every concept's top-k sets (one row per concept × set × block), with normalised depth."""
    rows = []
    for (concept_class, concept), table in enrichment_table.groupby(["concept_class", "concept"], sort=False):
        sets = block_sets(torch.tensor(table.score.to_numpy()), torch.tensor(table.evidence.to_numpy()), fractions,
                          n_random=0)
        rows += [(concept_class, concept, name, block, block / (len(table) - 1))
                 for name, blocks in sets.items() if name.startswith("top") for block in blocks]
    return pd.DataFrame(rows, columns=["concept_class", "concept", "block_set", "block", "depth"])
