"""Layer enrichment: permutation p-values, BH q-values, enrichment scores and block selection on synthetic tensors."""

from __future__ import annotations

import itertools

import pytest
import torch

from steer_utils.core.enrichment import (
    HOW,
    benjamini_hochberg,
    enrichment_scores,
    k_from_fraction,
    min_attainable_pvalue,
    permutation_pvalues,
    select_blocks,
)

ROW = torch.tensor([0.30, 0.25, 0.20, 0.15, 0.10])  # hand-checkable attention over m=5 user columns


def dirichlet_rows(n: int, n_blocks: int, n_heads: int, m: int, seed: int = 0) -> torch.Tensor:
    """I.i.d. flat-Dirichlet attention rows, (n, n_blocks, n_heads, m)."""
    gen = torch.Generator().manual_seed(seed)
    weights = -torch.rand(n, n_blocks, n_heads, m, generator=gen).log()
    return weights / weights.sum(-1, keepdim=True)


def one_prompt(row: torch.Tensor, start: int, end: int, width: int | None = None, pad: float = 9.0):
    """Inputs for a single prompt / block / head, with padding columns holding `pad` up to `width`."""
    width = width or len(row)
    padded = torch.cat([row, torch.full((width - len(row),), pad)]).view(1, 1, 1, width)
    return padded, torch.tensor([len(row)]), torch.tensor([[start, end]])


def spans(n: int, start: int, end: int) -> torch.Tensor:
    return torch.tensor([[start, end]] * n)


def test_planted_block_is_enriched():
    n, n_blocks, n_heads, m = 64, 6, 4, 30
    rows = dirichlet_rows(n, n_blocks, n_heads, m)
    rows[:, 3, :, :8] += 0.5  # every head of block 3 puts most of its mass on the prefix
    rows = rows / rows.sum(-1, keepdim=True)
    scores = enrichment_scores(permutation_pvalues(rows, torch.full((n,), m), spans(n, 0, 8)))
    assert scores.shape == (n_blocks,)
    assert scores[3] > 0.9
    assert torch.cat([scores[:3], scores[4:]]).max() < 0.05
    assert select_blocks(scores, 1, "top") == [3]


def test_null_data_gives_calibrated_pvalues():
    n, n_blocks, n_heads, m = 200, 10, 8, 30
    pvalues = permutation_pvalues(dirichlet_rows(n, n_blocks, n_heads, m, seed=1), torch.full((n,), m), spans(n, 3, 11))
    share = (pvalues < 0.01).double().mean().item()
    assert 0.003 < share < 0.025
    assert 0.4 < pvalues.mean().item() < 0.6  # roughly uniform


def test_exact_scattered_pvalue_matches_enumeration():
    rows, m, span = one_prompt(ROW, 1, 3, width=7)  # T_obs = 0.25 + 0.20; padding columns are ignored
    others = [c for c in itertools.combinations(range(5), 2) if c != (1, 2)]
    assert len(others) == 9
    at_least = sum(ROW[list(c)].sum() >= ROW[1] + ROW[2] - 1e-6 for c in others)  # (0,1), (0,2), (0,3): a float tie
    assert at_least == 3
    p = permutation_pvalues(rows, m, span, null="scattered")
    assert p.dtype == torch.float64 and p.shape == (1, 1, 1)
    assert p.item() == pytest.approx(4 / 10, abs=1e-12)
    assert permutation_pvalues(*one_prompt(ROW, 0, 2), null="scattered").item() == pytest.approx(1 / 10, abs=1e-12)
    # float32 tie: 0.1 + 0.2 (prefix) vs 0.05 + 0.25 differ by ~4e-9 after rounding but must count as a tie; the pairs
    # >= 0.3 are {0,3} {0,4} {1,3} {1,4} {2,4} {3,4} and the tie {2,3}: p = (1 + 7) / (1 + 9)
    tie = torch.tensor([0.10, 0.20, 0.05, 0.25, 0.40])
    assert tie.double()[:2].sum() != tie.double()[2:4].sum()  # not an exact tie once promoted to float64
    assert permutation_pvalues(*one_prompt(tie, 0, 2), null="scattered").item() == pytest.approx(0.8, abs=1e-12)


def test_exact_contiguous_pvalue_by_hand():
    # prefix [1, 3): T = 0.45; other spans [0, 2) = 0.55, [2, 4) = 0.35, [3, 5) = 0.25 -> p = (1 + 1) / (1 + 3)
    assert permutation_pvalues(*one_prompt(ROW, 1, 3, width=6), null="contiguous").item() == pytest.approx(0.5)
    assert permutation_pvalues(*one_prompt(ROW, 0, 2), null="contiguous").item() == pytest.approx(0.25)
    assert permutation_pvalues(*one_prompt(ROW, 3, 5), null="contiguous").item() == pytest.approx(1.0)


def test_min_attainable_pvalue():
    assert min_attainable_pvalue(31, 9, "contiguous") == pytest.approx(1 / 23)
    assert min_attainable_pvalue(31, 9, "scattered") == pytest.approx(1 / 1001)
    assert min_attainable_pvalue(5, 2, "scattered") == pytest.approx(1 / 10)
    assert min_attainable_pvalue(500, 9, "contiguous", n_draws=100) == pytest.approx(1 / 101)


@pytest.mark.parametrize("null", ["scattered", "contiguous"])
def test_pvalues_in_range_monotone_deterministic_and_per_head(null):
    n, m = 6, 40
    rows = dirichlet_rows(n, 3, 2, m, seed=2)
    lengths, prefix = torch.tensor([40, 35, 30, 25, 20, 12]), spans(n, 2, 9)
    kwargs = dict(null=null, n_draws=20)  # contiguous with m - L > 20 exercises the sampled branch
    previous = permutation_pvalues(rows, lengths, prefix, **kwargs)
    assert ((previous > 0) & (previous <= 1)).all()
    torch.testing.assert_close(previous, permutation_pvalues(rows, lengths, prefix, **kwargs), rtol=0, atol=0)
    single = permutation_pvalues(rows[:, 1:2, 1:2], lengths, prefix, **kwargs)  # vectorisation: no cross-talk
    torch.testing.assert_close(single, previous[:, 1:2, 1:2], rtol=0, atol=0)
    for delta in (0.001, 0.01, 0.05, 0.2, 10.0):
        raised = rows.clone()
        raised[..., 2:9] += delta
        current = permutation_pvalues(raised, lengths, prefix, **kwargs)
        assert (current <= previous).all()
        previous = current
    floor = torch.tensor([min_attainable_pvalue(m, 7, null, n_draws=20) for m in lengths.tolist()], dtype=torch.float64)
    torch.testing.assert_close(previous, floor.view(n, 1, 1).expand_as(previous))  # huge prefix mass: smallest p


def test_benjamini_hochberg_hand_example():
    p = torch.tensor([0.01, 0.04, 0.03, 0.20], dtype=torch.float64)
    # ranks 1, 3, 2, 4: raw 0.04, 0.0533, 0.06, 0.20 -> step-up min from the top: 0.04, 0.0533, 0.0533, 0.20
    torch.testing.assert_close(
        benjamini_hochberg(p), torch.tensor([0.04, 0.16 / 3, 0.16 / 3, 0.20], dtype=torch.float64)
    )
    grid = p.view(2, 2)
    torch.testing.assert_close(benjamini_hochberg(grid), benjamini_hochberg(p).view(2, 2))
    assert (benjamini_hochberg(torch.tensor([0.9, 1.0, 0.99])) <= 1).all()
    with pytest.raises(ValueError, match="must lie in"):
        benjamini_hochberg(torch.tensor([0.5, 1.5]))


def test_enrichment_scores_with_fdr_are_not_larger():
    pvalues = torch.rand(50, 5, 4, generator=torch.Generator().manual_seed(3)) ** 3
    plain, fdr = enrichment_scores(pvalues, alpha=0.05), enrichment_scores(pvalues, alpha=0.05, fdr=True)
    assert (fdr <= plain).all() and plain.sum() > fdr.sum()
    manual = (pvalues < 0.05).double().mean(dim=(0, 2))
    torch.testing.assert_close(plain, manual)
    with pytest.raises(ValueError, match="alpha"):
        enrichment_scores(pvalues, alpha=1.5)


def test_select_blocks():
    scores = torch.tensor([0.5, 0.9, 0.1, 0.9, 0.3, 0.0])
    assert HOW == ("top", "bottom", "random", "all")
    assert select_blocks(scores, 2, "top") == [1, 3]
    assert select_blocks(scores, 1, "top") == [1]  # tie with block 3 -> lower index
    assert select_blocks(scores, 3, "top") == [0, 1, 3]
    assert select_blocks(scores, 2, "bottom") == [2, 5]
    assert select_blocks(scores, 1, "bottom", candidates=[1, 2, 3]) == [2]
    assert select_blocks(scores, 1, "top", candidates=[2, 3, 4]) == [3]
    assert select_blocks(scores, 99, "all", candidates=range(1, 6)) == [1, 2, 3, 4, 5]
    picked = select_blocks(scores, 3, "random", seed=7, candidates=range(1, 6))
    assert picked == select_blocks(scores, 3, "random", seed=7, candidates=range(1, 6))
    assert len(picked) == 3 and picked == sorted(picked) and set(picked) <= {1, 2, 3, 4, 5}
    draws = {tuple(select_blocks(scores, 3, "random", seed=s, candidates=range(1, 6))) for s in range(20)}
    assert len(draws) > 1


def test_select_blocks_errors():
    scores = torch.zeros(30)
    with pytest.raises(ValueError, match=r"k=40 is larger than the 29 candidate blocks; choose k <= 29"):
        select_blocks(scores, 40, "top", candidates=range(1, 30))
    with pytest.raises(ValueError, match="k=0 must be at least 1"):
        select_blocks(scores, 0, "random")
    with pytest.raises(ValueError, match="Unknown block selection 'best'"):
        select_blocks(scores, 3, "best")
    with pytest.raises(ValueError, match="candidates"):
        select_blocks(scores, 3, "top", candidates=[1, 30])


def test_k_from_fraction():
    assert k_from_fraction(0.25, 29) == 7
    assert k_from_fraction(1.0, 29) == 29
    assert k_from_fraction(0.001, 29) == 1
    for bad in (0.0, 1.2, -0.5):
        with pytest.raises(ValueError, match="fraction"):
            k_from_fraction(bad, 29)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(null="exact"), "Unknown null 'exact'"),
        (dict(n_draws=0), "n_draws=0"),
        (dict(rows=torch.rand(2, 3, 8)), "rows must be"),
        (dict(user_lengths=torch.tensor([8, 8, 8])), "user_lengths must be"),
        (dict(prefix_spans=torch.tensor([[0, 2], [3, 3]])), "non-empty span"),
        (dict(prefix_spans=torch.tensor([[0, 2], [5, 9]])), "inside the 8 user columns"),
        (dict(user_lengths=torch.tensor([8, 12])), "must be in 1..8"),
    ],
)
def test_bad_inputs_raise(change, match):
    kwargs = dict(
        rows=torch.rand(2, 3, 4, 8), user_lengths=torch.tensor([8, 8]), prefix_spans=torch.tensor([[0, 2], [1, 4]])
    )
    with pytest.raises(ValueError, match=match):
        permutation_pvalues(**{**kwargs, **change})
    with pytest.raises(ValueError, match="Unknown null"):
        min_attainable_pvalue(31, 9, "exact")
