"""Extraction, token selection, labels, vectors and steering on tiny random models (exact identities)."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
import torch

from steer_utils import cache, paths
from steer_utils.core import decoding, enrichment, extraction, prompting, steering, training, vectors
from steer_utils.core.extraction import extract, extract_reference, find_blocks, shared_length, user_layout
from steer_utils.experiments import data, evaluation, layers, pipeline

STATEMENTS = [
    "Patience usually beats raw talent over a long career.",
    "Small towns remember everything.",
    "Most habits are easier to start than to break.",
    "A good teacher changes more lives than a good law.",
]


@pytest.fixture(scope="module")
def prompts(tiny):
    _, tokenizer, _ = tiny
    prefixed, plain = prompting.paired_prompts(tokenizer, "moods", "Cheerful", STATEMENTS)
    return prefixed, plain, len(prompting.shared_tail(prefixed + plain))


def test_extraction_is_padding_invariant(tiny, prompts):
    model, tokenizer, info = tiny
    prefixed, plain, n_tail = prompts
    mixed = [prefixed[0], plain[1], prefixed[2]]  # different lengths -> left padding
    batch = extract(model, mixed, n_tail, tokenizer.pad_token_id, batch_size=3)
    for i, prompt in enumerate(mixed):
        alone = extract(model, [prompt], n_tail, tokenizer.pad_token_id)
        torch.testing.assert_close(batch.hidden[i], alone.hidden[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(batch.attn_prefix[i], alone.attn_prefix[0], atol=1e-6, rtol=1e-5)
    assert batch.hidden.shape == (3, info.n_blocks, n_tail, info.hidden_size)
    assert batch.attn_prefix.shape == (3, info.n_blocks, info.n_heads, n_tail)
    assert batch.attn_prefix[1].abs().sum() == 0  # unprefixed prompt: no prefix span


@torch.inference_mode()
def test_extraction_matches_a_simple_reference_pass(tiny, prompts):
    model, tokenizer, info = tiny
    prefixed, _, n_tail = prompts
    ours = extract(model, prefixed[:1], n_tail, tokenizer.pad_token_id)
    ids = torch.tensor([prefixed[0].input_ids])
    out = model(ids, output_hidden_states=True, output_attentions=True)
    start, end = prefixed[0].prefix_span
    for block in range(info.n_blocks - 1):  # the last entry of hidden_states is after the final norm
        torch.testing.assert_close(
            ours.hidden[0, block], out.hidden_states[block + 1][0, -n_tail:], atol=1e-5, rtol=1e-5
        )
    for block in range(info.n_blocks):
        expected = out.attentions[block][0, :, -n_tail:, start:end].sum(-1)  # (heads, n_tail)
        torch.testing.assert_close(ours.attn_prefix[0, block], expected, atol=1e-6, rtol=1e-5)


# Fast path vs reference loop, per model precision: (atol as a share of the largest |value|, rtol).
# fp32: both paths differ only in summation order (measured ~1e-6 of the scale on SmolLM2 and the tiny models).
# bf16: one rounding is 2^-8 of a value; AMX/oneDNN kernels and the emulated path accumulate in different orders,
# so a few roundings per block are allowed (tests/core/test_precision.py checks that a one-position shift, what a
# padding or position-id bug does, still exceeds these bounds).
HIDDEN_TOLERANCE = {torch.float32: (2e-5, 1e-4), torch.bfloat16: (1e-2, 2**-7)}
ATTENTION_TOLERANCE = {torch.float32: (2e-5, 1e-4), torch.bfloat16: (2e-2, 2**-7)}
LABEL_TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (0.05, 0.05)}  # (atol, rtol) of the soft labels
VECTOR_COSINE = {torch.float32: 0.999, torch.bfloat16: 0.99}
VAL_CORR_TIE = {torch.float32: 1e-3, torch.bfloat16: 2e-2}  # grid points whose held-out |corr| differ by this tie


def assert_fast_path_matches_reference(
    model, tokenizer, concept_class: str, concept: str, statements: list[str], batch_size: int = 3
) -> None:
    """Shared-prefix batched extraction vs the batch-1 two-pass loop: same hidden states (all blocks but the last,
    which `output_hidden_states` returns after the final norm), attention sums, labels and vectors, within the
    tolerances of the model's precision."""
    dtype = next(model.parameters()).dtype
    (h_atol, h_rtol), (a_atol, a_rtol) = HIDDEN_TOLERANCE[dtype], ATTENTION_TOLERANCE[dtype]
    prefixed, plain = prompting.paired_prompts(tokenizer, concept_class, concept, statements)
    n_tail = len(prompting.shared_tail(prefixed + plain))
    assert shared_length(prefixed, n_tail) > 0  # the fast path really reuses a shared part
    fast = [
        extract(model, p, n_tail, tokenizer.pad_token_id, batch_size, keep_user_attention=True)
        for p in (prefixed, plain)
    ]
    slow = [extract_reference(model, p, n_tail) for p in (prefixed, plain)]
    for ours, ref in zip(fast, slow):
        scale = ref.hidden.abs().amax()
        torch.testing.assert_close(ours.hidden[:, :-1], ref.hidden[:, :-1], atol=h_atol * scale, rtol=h_rtol)
        torch.testing.assert_close(ours.attn_prefix, ref.attn_prefix, atol=a_atol, rtol=a_rtol)
    lengths, spans = user_layout(prefixed)
    on_prefix = torch.stack([fast[0].attn_user[i, ..., s:e].sum(-1) for i, (s, e) in enumerate(spans.tolist())])
    torch.testing.assert_close(on_prefix.transpose(2, 3), fast[0].attn_prefix, atol=1e-6, rtol=1e-5)  # same pass
    tail = prompting.tail_token_names(tokenizer, prompting.shared_tail(prefixed + plain))
    acts = [training.ConceptActivations(concept_class, concept, p, q, tail, lengths, spans) for p, q in (fast, slow)]
    setting = training.Setting("attention", "soft", "rfm")
    (x_fast, y_fast, _, chosen_fast), (x_ref, y_ref, _, chosen_ref) = (training.training_set(a, setting) for a in acts)
    # A block may pick another token only where the reference's two best positions tie within the tolerance.
    top2 = slow[0].attn_prefix_mean.amax(0).topk(2, dim=-1).values  # (n_blocks, 2)
    tied = (top2[:, 0] - top2[:, 1]) <= 2 * a_atol
    assert ((chosen_fast == chosen_ref) | tied).all()
    same = chosen_fast == chosen_ref
    y_atol, y_rtol = LABEL_TOLERANCE[dtype]
    torch.testing.assert_close(y_fast[:, same], y_ref[:, same], atol=y_atol, rtol=y_rtol)
    keep = slice(0, x_fast.shape[1] - 1)
    (v_fast, fit_fast), (v_ref, fit_ref) = (
        vectors.fit_rfm(x[:, keep], y[:, keep]) for x, y in ((x_fast, y_fast), (x_ref, y_ref))
    )
    # Likewise a block may fit with another (bandwidth, normalisation) only where the two grid points' held-out
    # correlations tie (seen on SmolLM2 with Intel's fp32 kernels: 0.89702 vs 0.89730 at block 22, cosine 0.98).
    same_fit = torch.tensor(
        [
            (a["bandwidth"], a["row_normalise"]) == (b["bandwidth"], b["row_normalise"])
            for a, b in zip(fit_fast, fit_ref)
        ]
    )
    corr_gap = torch.tensor([abs(a["val_corr"] - b["val_corr"]) for a, b in zip(fit_fast, fit_ref)])
    assert (same_fit | (corr_gap <= VAL_CORR_TIE[dtype])).all(), corr_gap
    compared = same[keep] & same_fit
    assert compared.float().mean() >= 0.8  # ties are the exception: most blocks are compared
    cosine = torch.nn.functional.cosine_similarity(v_fast, v_ref, dim=-1).abs()[compared]
    assert cosine.min() > VECTOR_COSINE[dtype], cosine


def test_fast_extraction_matches_the_reference_loop(tiny):
    model, tokenizer, _ = tiny
    assert_fast_path_matches_reference(model, tokenizer, "moods", "Cheerful", data.load_statements(n=24), batch_size=5)


def test_token_selection_on_planted_attention():
    attn = torch.zeros(3, 2, 4)
    attn[1, 0, 2] = 0.9  # block 0: position 2 wins on one prompt
    attn[:, 1, 0] = 0.3
    attn[0, 1, 3] = 0.35  # block 1: position 3 wins by the maximum over prompts
    assert training.select_tokens(attn, "attention").tolist() == [2, 3]
    assert training.select_tokens(attn, "fixed").tolist() == [3, 3]
    assert training.select_tokens(attn, "fixed", fixed_position=0).tolist() == [0, 0]
    with pytest.raises(ValueError, match="Unknown token selection"):
        training.select_tokens(attn, "random")
    values = torch.arange(3 * 2 * 4).float().view(3, 2, 4)
    assert training.gather_selected(values, torch.tensor([2, 3])).tolist() == [[2, 7], [10, 15], [18, 23]]


def test_labels_hard_soft_and_constant():
    attn = torch.tensor([[0.2, 0.5], [0.4, 0.5]])
    hard = training.make_labels("hard", attn, 2)
    assert hard[:, 0].tolist() == [1, 1, 0, 0]
    soft = training.make_labels("soft", attn, 2)
    assert soft[:, 0].tolist() == pytest.approx([0.5, 1.0, 0.0, 0.0])
    constant = training.minmax_scale(torch.full((4, 2), 0.3))
    assert not constant.isnan().any() and constant.abs().sum() == 0
    with pytest.raises(ValueError, match="Unknown labels"):
        training.make_labels("fuzzy", attn, 2)


def _naive_agop(X, y, L, reg=1e-3, iters=10):
    X = X.double() - X.double().mean(0)
    M = torch.eye(X.shape[1], dtype=torch.float64)
    for _ in range(iters):
        diff = X[:, None, :] - X[None, :, :]
        dist = torch.einsum("ijd,de,ije->ij", diff, M, diff).clamp(min=0).sqrt()
        K = torch.exp(-dist / L)
        alpha = torch.linalg.solve(K + reg * torch.eye(len(X), dtype=torch.float64), y.double())
        coef = torch.where(dist > 0, K / dist, torch.zeros_like(K)) / L * alpha[None, :]
        G = -torch.einsum("ij,ijd->id", coef, diff) @ M
        G = G - G.mean(0)
        M = G.T @ G / len(G)
        M = M / M.max()
    return M


@pytest.mark.parametrize("bandwidth", [1.0, 10.0, 100.0])
def test_rfm_agop_matches_the_textbook_update(bandwidth):
    torch.manual_seed(0)
    X, y = torch.randn(30, 8), torch.rand(30)
    M = vectors.rfm_agop(X, y, bandwidth, iters=5)
    assert M.shape == (8, 8) and M.max().item() == pytest.approx(1.0)
    torch.testing.assert_close(M, _naive_agop(X, y, bandwidth, iters=5), atol=1e-6, rtol=1e-5)
    assert torch.equal(vectors.rfm_agop(X, y, bandwidth, iters=0), torch.eye(8, dtype=torch.float64))


def test_rfm_recovers_a_planted_direction_with_per_block_signs():
    torch.manual_seed(0)
    n, d = 160, 24
    X = torch.randn(n, 2, d)
    is_prefixed = torch.arange(n) < n // 2
    X[is_prefixed, 0, 3] += 4.0  # block 0: prefixed examples are high along +e3
    X[is_prefixed, 1, 7] -= 4.0  # block 1: prefixed examples are low along e7
    y = is_prefixed.float()[:, None].expand(n, 2)
    vec, details = vectors.fit_concept_vector("rfm", X, y, is_prefixed, torch.ones(2))
    assert vec.directions[0][3] > 0.9 and vec.directions[1][7] < -0.9
    assert all(d["bandwidth"] in vectors.RFM_BANDWIDTHS for d in details)
    for method in ["linear", "logistic", "mean_difference", "pca"]:
        base, _ = vectors.fit_concept_vector(method, X, y, is_prefixed, torch.ones(2))
        assert base.directions[0][3] > 0.8 and base.directions[1][7] < -0.8, method


def test_concept_vector_round_trip(tmp_path):
    vec = vectors.ConceptVector(
        {1: torch.tensor([0.6, 0.8]), 2: torch.tensor([1.0, 0.0])},
        {1: 3.5, 2: 4.0},
        {"model": "m", "concept": "Cheerful", "method": "rfm"},
    )
    vec.save(tmp_path / "v.safetensors")
    back = vectors.ConceptVector.load(tmp_path / "v.safetensors")
    assert back.norms == vec.norms and back.metadata == vec.metadata
    assert all(torch.equal(back.directions[b], vec.directions[b]) for b in vec.directions)


def _hook_ids(model):
    """Ids of every forward hook on the blocks (transformers may keep its own output-recording hooks)."""
    return [sorted(b._forward_hooks) for b in find_blocks(model)]


def _capture(model, block):
    seen = {}
    handle = find_blocks(model)[block].register_forward_hook(
        lambda m, a, o: seen.update(h=(o[0] if isinstance(o, tuple) else o).clone())
    )
    return seen, handle


@torch.inference_mode()
def test_steering_adds_exactly_and_restores_the_model(tiny):
    model, tokenizer, info = tiny
    ids = torch.tensor([tokenizer("A small test sentence.")["input_ids"]])
    base_logits = model(ids).logits
    hooks_before = _hook_ids(model)
    v = torch.nn.functional.normalize(torch.randn(info.hidden_size), dim=0)
    vec = vectors.ConceptVector({0: v, 1: v}, {0: 2.0, 1: 3.0})
    with steering.steer(model, vectors.steering_additions([vec], [0.0], [0, 1])):
        torch.testing.assert_close(model(ids).logits, base_logits, atol=0, rtol=0)  # eps 0 = unsteered
    seen, handle = _capture(model, 1)
    model(ids)
    original = seen["h"]
    handle.remove()
    additions = vectors.steering_additions([vec], [0.5], [1])
    with steering.steer(model, additions):
        seen, handle = _capture(model, 1)
        model(ids)
        handle.remove()
    torch.testing.assert_close(seen["h"], original + 0.5 * 3.0 * v, atol=1e-6, rtol=0)
    assert _hook_ids(model) == hooks_before
    torch.testing.assert_close(model(ids).logits, base_logits, atol=0, rtol=0)


def test_hooks_are_removed_on_exceptions(tiny):
    model, _, info = tiny
    hooks_before = _hook_ids(model)
    vec = vectors.ConceptVector({1: torch.ones(info.hidden_size)}, {1: 1.0})
    with pytest.raises(RuntimeError, match="boom"):
        with steering.steer(model, vectors.steering_additions([vec], [1.0], [1])):
            raise RuntimeError("boom")
    assert _hook_ids(model) == hooks_before
    with pytest.raises(ValueError, match="Block 7 does not exist"):
        with steering.steer(model, {7: torch.ones(info.hidden_size)}):
            pass
    assert _hook_ids(model) == hooks_before
    with pytest.raises(ValueError, match="coefficient grid is empty"):
        vectors.steering_additions([], [], [1])


def test_batched_generation_matches_single_rows(tiny):
    model, tokenizer, info = tiny
    vec = vectors.ConceptVector(
        {b: torch.nn.functional.normalize(torch.randn(info.hidden_size), dim=0) for b in range(info.n_blocks)},
        {b: 5.0 for b in range(info.n_blocks)},
    )
    grid = pipeline.generate_grid(
        model, tokenizer, {"s": vec}, ["Hi there.", "Tell me more."], [0.0, 2.0], [0, 1], max_new_tokens=5
    )
    assert list(grid.coefficient) == [0.0, 0.0, 2.0, 2.0] and list(grid.question_id) == [0, 1, 0, 1]
    plain = decoding.generate(model, tokenizer, ["Hi there.", "Tell me more."], max_new_tokens=5)
    assert list(grid.response[:2]) == plain
    alone = decoding.generate(
        model, tokenizer, ["Tell me more."], vectors.steering_additions([vec], [2.0], [0, 1]), max_new_tokens=5
    )
    assert grid.response[3] == alone[0]


def test_cache_computes_once(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "CACHE_DIR", tmp_path)
    calls = []
    compute = lambda: calls.append(1) or {"x": torch.arange(3)}  # noqa: E731
    key = cache.cache_key("stage", 1, a=1)
    first, second = cache.cached_tensors("stage", key, compute), cache.cached_tensors("stage", key, compute)
    assert len(calls) == 1 and torch.equal(first["x"], second["x"])
    assert cache.cache_key("stage", 2, a=1) != key and cache.cache_key("stage", 1, a=2) != key
    assert not list(tmp_path.rglob(".*"))  # no temporary files left behind


def test_per_row_block_sets_steer_only_their_blocks():
    v0, v1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    vec = vectors.ConceptVector({1: v0, 2: v1}, {1: 2.0, 2: 4.0})
    additions = vectors.steering_additions([vec, vec, vec], [0.5, 1.0, 0.25], [[1], [1, 2], [2]])
    assert sorted(additions) == [1, 2]
    torch.testing.assert_close(additions[1], torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 0.0]]), atol=0, rtol=0)
    torch.testing.assert_close(additions[2], torch.tensor([[0.0, 0.0], [0.0, 4.0], [0.0, 1.0]]), atol=0, rtol=0)
    with pytest.raises(ValueError, match="2 block lists for 3 rows"):
        vectors.steering_additions([vec, vec, vec], [1.0, 1.0, 1.0], [[1], [2]])


def test_block_sets_and_scaled_grid_on_a_planted_score():
    scores = torch.tensor([1.0, 0.0, 0.9, 0.8, 0.0, 0.1, 0.2, 0.0, 0.7])  # block 0 is never steered
    evidence = torch.arange(9, dtype=torch.float64) / 10  # breaks the ties between the zero-score blocks
    sets = layers.block_sets(scores, evidence, fractions=(0.25, 0.5), n_random=2, seed=0)
    assert sets["all"] == list(range(1, 9))
    assert sets["top-25%"] == [2, 3] and sets["bottom-25%"] == [1, 4]  # k = 2 of 8; ties -> lower evidence
    assert sets["top-50%"] == [2, 3, 6, 8] and sets["bottom-50%"] == [1, 4, 5, 7]
    assert sets["random-25%-d0"] != sets["random-25%-d1"] or sets["random-50%-d0"] != sets["random-50%-d1"]
    assert all(0 not in blocks and len(blocks) == len(set(blocks)) for blocks in sets.values())
    assert sets == layers.block_sets(scores, evidence, fractions=(0.25, 0.5), n_random=2, seed=0)  # seeded


def test_average_draws_merges_random_draws_only():
    from steer_utils.experiments import evaluation

    table = pd.DataFrame(
        {
            "block_set": ["top-25%", "random-25%-d0", "random-25%-d1", "random-25%-d2"] * 2,
            "concept_class": ["moods"] * 8,
            "concept": ["a"] * 4 + ["b"] * 4,
            "steerability": [1.0, 0.2, 0.4, 0.6, 0.0, 1.0, 0.0, 0.0],
            "steered_any": [1, 1, 1, 0, 0, 1, 0, 0],
            "n_questions": [5] * 8,
        }
    )
    merged = evaluation.average_draws(table)
    assert list(merged.block_set) == ["top-25%", "top-25%", "random-25%", "random-25%"]
    random = merged[merged.block_set == "random-25%"].set_index("concept")
    assert random.steerability.round(6).to_dict() == {"a": 0.4, "b": round(1 / 3, 6)}
    assert random.steered_any.to_dict() == {"a": 1, "b": 0} and random.n_draws.tolist() == [3, 3]


def test_concept_enrichment_finds_a_planted_block():
    n, n_blocks, n_tail, n_heads, width = 12, 4, 3, 2, 10
    attn_user = torch.full((n, n_blocks, n_tail, n_heads, width), 0.05)
    attn_user[:, 2, 1, :, :3] = 0.3  # block 2's tail token 1 looks at the 3-token prefix
    attn_prefix = attn_user[..., :3].sum(-1).transpose(2, 3)  # (n, n_blocks, n_heads, n_tail)
    hidden = torch.zeros(n, n_blocks, n_tail, 4)
    acts = training.ConceptActivations(
        "moods",
        "cheerful",
        extraction.Activations(hidden, attn_prefix, attn_user),
        extraction.Activations(hidden, attn_prefix),
        ["a", "b", "c"],
        torch.full((n,), width),
        torch.tensor([[0, 3]] * n),
    )
    table = layers.concept_enrichment(acts, n_draws=200)
    assert table.score.tolist() == [0.0, 0.0, 1.0, 0.0] and table.selected[2] == 1
    assert table.depth.tolist() == [0.0, 1 / 3, 2 / 3, 1.0] and (table.score_fdr <= 1).all()


def test_layer_selection_key_is_the_same_with_or_without_explicit_enrichment_defaults(monkeypatch):
    keys = []

    def stop(stage, version, **inputs):  # record the key's inputs, skip the computation
        keys.append(cache.cache_key(stage, version, **inputs))
        raise StopIteration

    monkeypatch.setattr(layers, "cache_key", stop)
    model = torch.nn.Linear(2, 2)  # only its dtype enters the key
    args = (pipeline.RunContext(model, None, "m", STATEMENTS, {"moods": ["Q?"]}), "moods", "Cheerful")
    for kwargs in [{}, dict(null="scattered", n_draws=1000, alpha=0.01, fdr_level=0.05), dict(n_draws=10)]:
        with pytest.raises(StopIteration):
            layers.run_concept(*args, **kwargs)
    assert keys[0] == keys[1] != keys[2]  # notebook 05 (no kwargs) reuses notebook 03's entries (all four given)


def test_stratified_subsample_keeps_the_share_of_positives_and_is_seeded():
    is_positive = torch.arange(100) < 20
    keep = vectors.stratified_subsample(is_positive, 50, seed=3)
    assert len(keep) == 50 and len(set(keep.tolist())) == 50 and (keep.diff() > 0).all()
    assert is_positive[keep].sum() == 10
    torch.testing.assert_close(keep, vectors.stratified_subsample(is_positive, 50, seed=3))
    assert not torch.equal(keep, vectors.stratified_subsample(is_positive, 50, seed=4))
    rare = torch.arange(100) < 1
    assert rare[vectors.stratified_subsample(rare, 10)].sum() == 1  # at least one of each kind


def test_rfm_above_the_cap_fits_the_stratified_subsample_and_below_it_changes_nothing():
    generator = torch.Generator().manual_seed(0)
    X = torch.randn(60, 2, 8, generator=generator)
    y = (torch.arange(60) < 20).float()[:, None].expand(60, 2).clone()
    X[:20] += 1.0  # the positives sit apart along every axis
    uncapped, _ = vectors.fit_rfm(X, y, iters=2, max_examples=None)
    torch.testing.assert_close(vectors.fit_rfm(X, y, iters=2, max_examples=60)[0], uncapped)
    keep = vectors.stratified_subsample(y[:, 0] > 0, 30, seed=0)
    capped, _ = vectors.fit_rfm(X, y, iters=2, max_examples=30)
    torch.testing.assert_close(capped, vectors.fit_rfm(X[keep], y[keep], iters=2, max_examples=None)[0])
    assert not torch.allclose(capped, uncapped)


def test_every_stage_addresses_the_cache_through_entry_path(tmp_path, monkeypatch):
    """One path function, the cache folder read at call time: patching paths.CACHE_DIR moves every stage."""
    monkeypatch.setattr(paths, "CACHE_DIR", tmp_path)
    assert cache.cache_dir() == tmp_path
    assert cache.entry_path("generations", "k", ".csv", "org/m") == tmp_path / "generations" / "org--m" / "k.csv"
    assert cache.entry_path("activations", "k", ".safetensors") == tmp_path / "activations" / "k.safetensors"
    with pytest.raises(ValueError, match="needs model name"):
        cache.entry_path("layers", "k", ".csv")
    with pytest.raises(ValueError, match="takes no model name"):
        cache.entry_path("activations", "k", model="m")
    package = Path(cache.__file__).parent
    for module in package.rglob("*.py"):  # nobody else joins CACHE_DIR or copies it
        text = module.read_text()
        assert module.name in ("paths.py", "cache.py") or not re.search(r"\bCACHE_DIR\b", text), module.name


def test_tail_tokens_and_smallest_pvalues_need_no_extraction(tiny, tmp_path, monkeypatch):
    """The tokenising shortcuts of notebooks 01 and 03 give what the extracted activations hold."""
    monkeypatch.setattr(paths, "CACHE_DIR", tmp_path)
    model, tokenizer, _ = tiny
    acts = pipeline.concept_activations(model, tokenizer, "tiny", "moods", "Cheerful", STATEMENTS, cached=False)
    assert pipeline.tail_tokens(tokenizer, "moods", "Cheerful", STATEMENTS) == acts.tail
    table = layers.smallest_pvalues(tokenizer, "moods", "Cheerful", STATEMENTS, n_draws=50)
    user_length, prefix_length = int(acts.user_lengths.min()), int(acts.prefix_spans.diff(dim=1).max())
    assert table.null.tolist() == list(enrichment.NULLS)
    assert table.shortest_user_text.eq(user_length).all() and table.longest_prefix.eq(prefix_length).all()
    assert table.smallest_p.tolist() == [
        enrichment.min_attainable_pvalue(user_length, prefix_length, null, 50) for null in enrichment.NULLS
    ]


def test_block_set_order_and_pairs_name_the_sets_block_sets_makes():
    sets = layers.block_sets(torch.arange(12.0), torch.zeros(12), fractions=(0.25, 0.5), n_random=2)
    names = {re.sub(evaluation.DRAW_SUFFIX, "", name) for name in sets}
    assert set(layers.block_set_order((0.25, 0.5))) == names
    assert layers.block_set_order((0.25,)) == ["all", "top-25%", "random-25%", "bottom-25%"]
    assert layers.block_set_pairs((0.25, 0.5)) == [
        ("bottom-25%", "top-25%"),
        ("random-25%", "top-25%"),
        ("bottom-50%", "top-50%"),
        ("random-50%", "top-50%"),
        ("all", "top-25%"),
        ("all", "top-50%"),
    ]
    assert {name for pair in layers.block_set_pairs((0.25, 0.5)) for name in pair} <= names
