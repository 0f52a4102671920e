"""Token selection: which shared tail position each block reads its training features from."""

from __future__ import annotations

import torch

TOKEN_SELECTIONS = ("fixed", "attention")  # where a concept vector reads each block: see `select_tokens`


def select_tokens(attn_prefix_mean: torch.Tensor, method: str = "attention", fixed_position: int = -1) -> torch.Tensor:
    """Tail index per block, shape (n_blocks,).

    attn_prefix_mean: (n_prompts, n_blocks, n_tail) head-averaged attention-to-prefix of the prefixed prompts.
    - `fixed`: the same tail position for every block (the prior method: -1, the last token of the
      assistant header);
    - `attention` (Eq. 3): per block, the position with the largest attention-to-prefix, maximised over prompts.
    """
    n_prompts, n_blocks, n_tail = attn_prefix_mean.shape
    if method == "fixed":
        if not -n_tail <= fixed_position < n_tail:
            raise ValueError(f"fixed_position={fixed_position} is outside the {n_tail} tail positions.")
        return torch.full((n_blocks,), fixed_position % n_tail, dtype=torch.long)
    if method == "attention":
        return attn_prefix_mean.amax(dim=0).argmax(dim=-1)  # (n_blocks, n_tail) -> (n_blocks,)
    raise ValueError(f"Unknown token selection '{method}'; use one of: {', '.join(TOKEN_SELECTIONS)}.")


def gather_selected(values: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """Pick each block's selected tail position: (n, n_blocks, n_tail, ...) -> (n, n_blocks, ...)."""
    index = selected.view(1, -1, 1, *([1] * (values.dim() - 3))).expand(values.shape[0], -1, 1, *values.shape[3:])
    return values.gather(2, index).squeeze(2)
