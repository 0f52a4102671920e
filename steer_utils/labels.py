"""Training labels: hard (1 prefixed / 0 not) or soft (Eq. 4: attention-to-prefix at the selected token)."""

from __future__ import annotations

import torch

LABEL_KINDS = ("hard", "soft")


def minmax_scale(labels: torch.Tensor) -> torch.Tensor:
    """Scale each column of (n, n_blocks) to [0, 1]; a constant column becomes all zeros (never NaN)."""
    low, high = labels.amin(dim=0, keepdim=True), labels.amax(dim=0, keepdim=True)
    span = high - low
    divisor = torch.where(span > 0, span, torch.ones_like(span))  # exact for any positive span, even a subnormal one
    return torch.where(span > 0, (labels - low) / divisor, torch.zeros_like(labels))


def make_labels(
    method: str, attn_selected: torch.Tensor, n_unprefixed: int, concept: str | None = None
) -> torch.Tensor:
    """Labels (n_prefixed + n_unprefixed, n_blocks): prefixed rows first, then unprefixed rows.

    attn_selected: (n_prefixed, n_blocks) head-averaged attention-to-prefix at each block's selected token.
    Raises a ValueError (naming `concept` when given) when a block's labels would be the same for every example,
    e.g. soft labels of a block whose selected token puts no attention at all on the prefix: there is nothing to fit.
    """
    if method not in LABEL_KINDS:
        raise ValueError(f"Unknown labels '{method}'; use one of: {', '.join(LABEL_KINDS)}.")
    of = f" of concept '{concept}'" if concept else ""
    n_prefixed, n_blocks = attn_selected.shape
    if n_prefixed < 1 or n_unprefixed < 1:
        raise ValueError(
            f"Labels{of} need prefixed and unprefixed examples, got {n_prefixed} and {n_unprefixed}; "
            "give at least one statement."
        )
    if method == "hard":
        positive = torch.ones(n_prefixed, n_blocks)
    else:
        positive = attn_selected.float()
        if not bool(torch.isfinite(positive).all()):
            raise ValueError(
                f"Soft labels{of} have NaN or infinite attention values; check the extraction "
                "(e.g. load the model with dtype='float32') or use hard labels."
            )
    raw = torch.cat([positive, torch.zeros(n_unprefixed, n_blocks)])
    constant = (raw.amax(dim=0) == raw.amin(dim=0)).nonzero().flatten().tolist()
    if constant:
        shown = constant if len(constant) <= 8 else constant[:8] + ["..."]
        raise ValueError(
            f"Soft labels{of} are all equal ({float(raw[0, constant[0]]):g}) over the {len(raw)} "
            f"examples in block(s) {shown}: the prefix gets no attention at the selected token, so there "
            "is nothing to fit; check the prefix span (data.encode_prompt) or use hard labels."
        )
    return minmax_scale(raw)
