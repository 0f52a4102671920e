"""Steering hooks: add eps * ||h_l|| * v_l to the output of chosen blocks, at every position or the answer's.

eps is relative to the block's typical hidden-state norm (`ConceptVector.norms`), so one coefficient
grid serves models whose activation scales differ. Several vectors and coefficients run in one batched
`generate` call: each row of the batch carries its own addition.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from .extraction import block_output, find_blocks
from .protocol import check_positions
from .resources import registered_hooks


@contextmanager
def steer(model: nn.Module, additions: dict[int, torch.Tensor], positions: str = "all") -> Iterator[None]:
    """While active, block l's output h becomes h + additions[l] at every position ('all') or, with
    positions='answer', only at the last position of a multi-token pass (the prompt's last token, whose output is the
    first answer token) and at every single-token decoding step.

    additions[l] is (d,) for the whole batch or (batch, d) per row. Hooks are removed on exit, even on error.
    """
    check_positions(positions)
    blocks = find_blocks(model)

    def make_hook(delta: torch.Tensor):
        def hook(module, args, output):
            hidden = block_output(output)
            shift = delta.to(hidden.device, hidden.dtype)
            shift = shift[:, None, :] if shift.dim() == 2 else shift  # broadcast over positions
            if positions == "answer" and hidden.shape[1] > 1:  # prompt pass: the last position only
                steered = torch.cat([hidden[:, :-1], hidden[:, -1:] + shift], dim=1)
            else:
                steered = hidden + shift
            return (steered, *output[1:]) if isinstance(output, tuple) else steered

        return hook

    with registered_hooks() as handles:
        for block, delta in additions.items():
            if not 0 <= block < len(blocks):
                raise ValueError(f"Block {block} does not exist; the model has blocks 0..{len(blocks) - 1}.")
            handles.append(blocks[block].register_forward_hook(make_hook(delta)))
        yield
