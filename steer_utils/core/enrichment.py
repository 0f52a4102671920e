"""Layer enrichment (Fig. 4): in which blocks do attention heads single out the concept prefix?

For each prefixed prompt, block and head we take the attention row of the block's selected tail token over the
prompt's *user text* (prefix + statement) and test whether the prefix span gets significantly more mass than other
position sets of the same size there. Template, BOS and system positions are left out on purpose: they are attention
sinks that soak up most of the mass and would make every test trivially non-significant. Statistic: T = summed
attention over a set; p = (1 + #{null T >= T_obs}) / (1 + N_null), the exact permutation p-value when enumerated.

Nulls: `contiguous` compares the prefix with every other span [s, s + L) of the user text; `scattered` with sets of
L distinct user positions (a label permutation: under the null, prefix positions are exchangeable with the others).
Scattered is the default because contiguous is too coarse: with ~31 user tokens and a 9-token prefix there are only
22 other spans, so the smallest attainable p is 1/23 ~ 0.043 and no head could pass alpha = 0.01
(`min_attainable_pvalue`). A block's enrichment score is the share of significant (statement, head) tests, optionally
after Benjamini-Hochberg FDR control over all tests; `select_blocks` picks the top/bottom/random k blocks to steer.
"""

from __future__ import annotations

import itertools
import math
import numbers
from typing import Sequence

import torch

NULLS = ("contiguous", "scattered")
HOW = ("top", "bottom", "random", "all")
TIE_TOLERANCE = 1e-6  # null T >= T_obs - tolerance counts as a tie, so float rounding never breaks one
CHUNK_ELEMENTS = 1 << 23  # bound on the (prompts, heads, null sets) statistics held at once (64 MiB of float64)


def _null_size(m: int, length: int, null: str, n_draws: int) -> tuple[int, bool]:
    """(number of null sets, whether they are enumerated exactly) for m user positions and an L-token prefix."""
    others = m - length if null == "contiguous" else math.comb(m, length) - 1
    return min(others, n_draws), others <= n_draws


def min_attainable_pvalue(user_length: int, prefix_length: int, null: str, n_draws: int = 1000) -> float:
    """Smallest p-value the test can return: 1 / (1 + N_null)."""
    if null not in NULLS:
        raise ValueError(f"Unknown null '{null}'; use one of: {', '.join(NULLS)}.")
    if not 1 <= prefix_length <= user_length or n_draws < 1:
        raise ValueError(
            f"Need 1 <= prefix_length={prefix_length} <= user_length={user_length} and n_draws={n_draws} >= 1."
        )
    return 1.0 / (1 + _null_size(user_length, prefix_length, null, n_draws)[0])


def _null_sets(m: int, start: int, length: int, null: str, n_draws: int, generator: torch.Generator) -> torch.Tensor:
    """Column indices of the null position sets, (N_null, L), never containing the observed span when exact."""
    n_null, exact = _null_size(m, length, null, n_draws)
    if null == "contiguous":
        starts = torch.tensor([s for s in range(m - length + 1) if s != start], dtype=torch.long)  # (m - L,)
        if not exact:
            starts = starts[torch.randperm(len(starts), generator=generator)[:n_draws]]
        return starts[:, None] + torch.arange(length)
    if exact:
        observed = tuple(range(start, start + length))
        subsets = [c for c in itertools.combinations(range(m), length) if c != observed]
        return torch.tensor(subsets, dtype=torch.long).reshape(n_null, length)
    return torch.rand(n_draws, m, generator=generator).argsort(dim=1)[:, :length]  # Monte Carlo, duplicates allowed


def permutation_pvalues(
    rows: torch.Tensor,
    user_lengths: torch.Tensor,
    prefix_spans: torch.Tensor,
    null: str = "scattered",
    n_draws: int = 1000,
    seed: int = 0,
) -> torch.Tensor:
    """Per-(prompt, block, head) p-values, (n, n_blocks, n_heads) float64, for "the head favours the prefix span".

    rows: (n, n_blocks, n_heads, W) attention over user-text columns; columns >= user_lengths[i] are padding.
    user_lengths: (n,) user-text length m_i; prefix_spans: (n, 2) [start, end) of the prefix in those columns.
    """
    if null not in NULLS:
        raise ValueError(f"Unknown null '{null}'; use one of: {', '.join(NULLS)}.")
    if n_draws < 1:
        raise ValueError(f"n_draws={n_draws} must be at least 1.")
    if rows.dim() != 4:
        raise ValueError(f"rows must be (n, n_blocks, n_heads, W), got shape {tuple(rows.shape)}.")
    n, n_blocks, n_heads, width = rows.shape
    if user_lengths.shape != (n,) or prefix_spans.shape != (n, 2):
        raise ValueError(
            f"user_lengths must be ({n},) and prefix_spans ({n}, 2) to match rows; got "
            f"{tuple(user_lengths.shape)} and {tuple(prefix_spans.shape)}."
        )
    selections, groups = [], {}
    for i, (m, (start, end)) in enumerate(zip(user_lengths.tolist(), prefix_spans.tolist())):
        if not 1 <= m <= width:
            raise ValueError(f"user_lengths[{i}]={m} must be in 1..{width} (the width of rows).")
        if not 0 <= start < end <= m:
            raise ValueError(
                f"prefix_spans[{i}]=[{start}, {end}) must be a non-empty span inside the {m} user "
                f"columns; pass [start, end) relative to the first user-text token."
            )
        generator = torch.Generator().manual_seed((seed << 32) + i)  # draws depend on (seed, prompt) only
        indices = torch.cat(
            [torch.arange(start, end)[None], _null_sets(m, start, end - start, null, n_draws, generator)]
        )
        selections.append(torch.zeros(len(indices), m, dtype=torch.float64).scatter_(1, indices, 1.0))  # (1 + N, m)
        groups.setdefault(selections[-1].shape, []).append(i)
    flat = rows.reshape(n, n_blocks * n_heads, width)
    pvalues = torch.empty(n, n_blocks * n_heads, dtype=torch.float64)
    for (size, m), members in groups.items():  # prompts sharing (1 + N_null, m): batched, in bounded chunks
        chunk = max(1, CHUNK_ELEMENTS // max(1, n_blocks * n_heads * size))
        for lo in range(0, len(members), chunk):
            index = torch.tensor(members[lo : lo + chunk])
            selection = torch.stack([selections[i] for i in members[lo : lo + chunk]])  # (g, 1 + N, m)
            stats = flat[index, :, :m].to(torch.float64) @ selection.transpose(1, 2)  # (g, n_blocks * n_heads, 1 + N)
            at_least = (stats[..., 1:] >= stats[..., :1] - TIE_TOLERANCE).sum(dim=-1)  # observed set is column 0
            pvalues[index] = (1 + at_least).to(torch.float64) / size
    return pvalues.reshape(n, n_blocks, n_heads)


def benjamini_hochberg(pvalues: torch.Tensor) -> torch.Tensor:
    """Benjamini-Hochberg q-values over all entries (step-up, clipped to <= 1), same shape as the input."""
    if pvalues.numel() and not bool(((pvalues >= 0) & (pvalues <= 1)).all()):
        raise ValueError("pvalues must lie in [0, 1] (and not be NaN); pass raw p-values, not scores.")
    flat = pvalues.reshape(-1).to(torch.float64)
    order = flat.argsort()
    ranked = flat[order] * len(flat) / torch.arange(1, len(flat) + 1, dtype=torch.float64)  # p_(r) * N / r
    stepped = ranked.flip(0).cummin(dim=0).values.flip(0).clamp(max=1.0)  # q_(r) = min_{s >= r} p_(s) N / s
    return torch.empty_like(flat).scatter_(0, order, stepped).reshape(pvalues.shape)


def enrichment_scores(pvalues: torch.Tensor, alpha: float = 0.01, fdr: bool = False) -> torch.Tensor:
    """Share of significant (statement, head) tests per block: (n, n_blocks, n_heads) -> (n_blocks,)."""
    if pvalues.dim() != 3:
        raise ValueError(f"pvalues must be (n, n_blocks, n_heads), got shape {tuple(pvalues.shape)}.")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha={alpha} must be in (0, 1), e.g. 0.01.")
    values = benjamini_hochberg(pvalues) if fdr else pvalues  # BH over all n * n_blocks * n_heads tests
    return (values < alpha).to(torch.float64).mean(dim=(0, 2))


def evidence(pvalues: torch.Tensor) -> torch.Tensor:
    """Mean -log10 p per block, (n, n_blocks, n_heads) -> (n_blocks,): a continuous companion to the score."""
    return -pvalues.log10().mean(dim=(0, 2))


def select_blocks(
    scores: torch.Tensor,
    k: int,
    how: str,
    seed: int = 0,
    candidates: Sequence[int] | None = None,
    tiebreak: torch.Tensor | None = None,
) -> list[int]:
    """Sorted block indices: the top / bottom / random k candidate blocks by enrichment score, or all candidates.

    Equal scores are ordered by `tiebreak` (e.g. `evidence`), then by block index."""
    if how not in HOW:
        raise ValueError(f"Unknown block selection '{how}'; use one of: {', '.join(HOW)}.")
    n_blocks = len(scores)
    pool = list(range(n_blocks)) if candidates is None else [int(b) for b in candidates]
    if not pool or len(set(pool)) != len(pool) or not all(0 <= b < n_blocks for b in pool):
        raise ValueError(f"candidates must be distinct block indices in 0..{n_blocks - 1}; got {pool}.")
    if how == "all":
        return sorted(pool)
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise ValueError(
            f"k={k!r} must be a whole number of blocks, got {type(k).__name__}; e.g. k=3, or use "
            "k_from_fraction(0.25, n) for a share of the blocks."
        )
    if k < 1:
        raise ValueError(f"k={k} must be at least 1; choose k in 1..{len(pool)}.")
    if k > len(pool):
        raise ValueError(f"k={k} is larger than the {len(pool)} candidate blocks; choose k <= {len(pool)}.")
    if how == "random":
        generator = torch.Generator().manual_seed(seed)
        return sorted(pool[j] for j in torch.randperm(len(pool), generator=generator)[:k].tolist())
    sign = -1.0 if how == "top" else 1.0
    second = torch.zeros(n_blocks) if tiebreak is None else tiebreak
    return sorted(sorted(pool, key=lambda b: (sign * float(scores[b]), sign * float(second[b]), b))[:k])


def k_from_fraction(fraction: float, n_candidates: int) -> int:
    """Number of blocks for a fraction of the candidates: round(fraction * n), at least 1."""
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real):
        raise ValueError(
            f"fraction={fraction!r} must be a number in (0, 1], got {type(fraction).__name__}; "
            "e.g. 0.25 for a quarter of the blocks."
        )
    if not 0 < fraction <= 1:
        raise ValueError(
            f"fraction={fraction} must be in (0, 1], e.g. 0.25 for a quarter of the blocks; a fraction "
            "above 1 would ask for more blocks than there are."
        )
    if isinstance(n_candidates, bool) or not isinstance(n_candidates, numbers.Integral) or n_candidates < 1:
        raise ValueError(
            f"n_candidates={n_candidates!r} must be a positive integer: the number of blocks "
            "to choose from (the steerable blocks)."
        )
    return max(1, round(fraction * n_candidates))
