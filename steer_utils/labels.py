"""Training labels: hard (1 prefixed / 0 not) or soft (Eq. 4: attention-to-prefix at the selected token)."""
from __future__ import annotations

import torch

METHODS = ("hard", "soft")


def minmax_scale(labels: torch.Tensor) -> torch.Tensor:
    """Scale each column of (n, n_blocks) to [0, 1]; a constant column becomes all zeros (never NaN)."""
    low, high = labels.amin(dim=0, keepdim=True), labels.amax(dim=0, keepdim=True)
    span = high - low
    return torch.where(span > 0, (labels - low) / span.clamp(min=torch.finfo(labels.dtype).tiny), torch.zeros_like(labels))


def make_labels(method: str, attn_selected: torch.Tensor, n_unprefixed: int) -> torch.Tensor:
    """Labels (n_prefixed + n_unprefixed, n_blocks): prefixed rows first, then unprefixed rows.

    attn_selected: (n_prefixed, n_blocks) head-averaged attention-to-prefix at each block's selected token.
    """
    n_prefixed, n_blocks = attn_selected.shape
    if method == "hard":
        positive = torch.ones(n_prefixed, n_blocks)
    elif method == "soft":
        positive = attn_selected.float()
    else:
        raise ValueError(f"Unknown labels '{method}'; use one of: {', '.join(METHODS)}.")
    return minmax_scale(torch.cat([positive, torch.zeros(n_unprefixed, n_blocks)]))
