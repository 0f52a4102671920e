"""Steering: add eps * ||h_l|| * v_l to the output of chosen blocks at every position, and generate.

eps is relative to the block's typical hidden-state norm (`ConceptVector.norms`), so one coefficient
grid serves models whose activation scales differ. Several vectors and coefficients run in one batched
`generate` call: each row of the batch carries its own addition.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Callable, ContextManager, Iterator, Sequence

import pandas as pd
import torch
from torch import nn

from .data import render_prompt
from .extraction import block_output, find_blocks
from .models import attention_implementation
from .resources import halving_batches
from .vectors import ConceptVector


def default_blocks(n_blocks: int) -> list[int]:
    """All blocks but the first (the paper's default)."""
    return list(range(1, n_blocks))


def steering_additions(vectors: Sequence[ConceptVector], coefficients: Sequence[float],
                       blocks: Sequence[int] | Sequence[Sequence[int]]) -> dict[int, torch.Tensor]:
    """Per-row additions {block: (rows, d)} = coefficient_r * norm_rl * v_rl, one row per (vector, coefficient).

    `blocks` lists the steered blocks, for all rows or (a list of lists) for each row; a row that does not
    steer a block gets zeros there.
    """
    if len(vectors) != len(coefficients):
        raise ValueError(f"Got {len(vectors)} vectors for {len(coefficients)} coefficients; give one per row.")
    if not len(coefficients):
        raise ValueError("The coefficient grid is empty; give at least one coefficient.")
    per_row = [list(b) for b in blocks] if len(blocks) and not isinstance(blocks[0], int) else [list(blocks)] * len(vectors)
    if len(per_row) != len(vectors):
        raise ValueError(f"Got {len(per_row)} block lists for {len(vectors)} rows; give one per row.")
    additions = {}
    for block in sorted(set().union(*per_row)):
        missing = [i for i, (v, b) in enumerate(zip(vectors, per_row)) if block in b and block not in v.directions]
        if missing:
            raise ValueError(f"Block {block} has no direction in vector(s) {missing}; choose blocks the vectors cover.")
        additions[block] = torch.stack([c * v.norms[block] * v.directions[block].float() if block in b
                                        else torch.zeros_like(next(iter(v.directions.values())), dtype=torch.float32)
                                        for v, c, b in zip(vectors, coefficients, per_row)])
    return additions


@contextmanager
def steer(model: nn.Module, additions: dict[int, torch.Tensor], positions: str = "all") -> Iterator[None]:
    """While active, block l's output h becomes h + additions[l] at every position ('all') or, with
    positions='answer', only at the last position of a multi-token pass (the prompt's last token, whose output is the
    first answer token) and at every single-token decoding step.

    additions[l] is (d,) for the whole batch or (batch, d) per row. Hooks are removed on exit, even on error.
    """
    if positions not in ("all", "answer"):
        raise ValueError(f"Unknown steering positions {positions!r}; use 'all' or 'answer'.")
    blocks = find_blocks(model)
    handles = []

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

    try:
        for block, delta in additions.items():
            if not 0 <= block < len(blocks):
                raise ValueError(f"Block {block} does not exist; the model has blocks 0..{len(blocks) - 1}.")
            handles.append(blocks[block].register_forward_hook(make_hook(delta)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def clean_response(text: str) -> str:
    """Strip whitespace, turn carriage returns into newlines (a bare '\\r' is not quoted by `to_csv` but splits
    rows in `read_csv`) and cut a plain-template continuation at the next 'User:' turn."""
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\nUser:")[0].strip()


@torch.inference_mode()
def generate(model: nn.Module, tokenizer, user_messages: Sequence[str], additions: dict[int, torch.Tensor] | None = None,
             max_new_tokens: int = 50, row_context: Callable[[range], ContextManager] | None = None,
             system: str | None = None, positions: str = "all") -> list[str]:
    """Greedy responses to chat-templated user messages, all in one batched call (SDPA attention), optionally steered.

    If the call runs out of memory, its rows are generated in halves (quarters, ...) instead
    (`resources.halving_batches`, warning once); every piece keeps the full batch's padding and its rows of the
    per-row additions, so the responses are the same. `row_context(rows)`, if given, returns a context manager that
    is active while the rows `rows` (a range) are generated, e.g. SADI's per-row scales for those rows.
    `system` is the system message (see `data.render_prompt`); `positions` where the additions apply (see `steer`).
    """
    prompts = [render_prompt(tokenizer, m, system) for m in user_messages]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    device = next(model.parameters()).device
    width, n = batch["input_ids"].shape[1], len(prompts)

    def run(rows: range) -> list[str]:
        part = {k: v[rows.start:rows.stop].to(device) for k, v in batch.items()}
        shifts = {b: a[rows.start:rows.stop] if a.dim() == 2 and len(a) == n else a  # per-row: this piece's rows
                  for b, a in (additions or {}).items()}
        with row_context(rows) if row_context else nullcontext(), steer(model, shifts, positions):
            out = model.generate(**part, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                 pad_token_id=tokenizer.pad_token_id)
        return tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)

    with attention_implementation(model, "sdpa"):
        parts = halving_batches(run, range(n), max(n, 1), "generation")
    return [clean_response(t) for part in parts for t in part]


def generate_grid(model: nn.Module, tokenizer, vectors: dict[str, ConceptVector], questions: Sequence[str],
                  coefficients: Sequence[float], blocks: Sequence[int] | dict[str, Sequence[int]],
                  max_new_tokens: int = 50, scales: dict[str, float] | None = None, system: str | None = None,
                  positions: str = "all") -> pd.DataFrame:
    """Every (arm, coefficient, question) of one concept in one `generate` call; one row each.

    An arm is a named vector, steered at `blocks` (one list, or a list per arm) with the coefficient grid
    multiplied by the arm's `scales` entry (default 1); `coefficient` is the grid value before scaling.
    `system` and `positions` as in `generate`.
    """
    scales = scales or {}
    rows = [(s, c, q) for s in vectors for c in coefficients for q in range(len(questions))]
    row_blocks = [blocks[s] for s, _, _ in rows] if isinstance(blocks, dict) else blocks
    eps = [c * scales.get(s, 1.0) for s, c, _ in rows]
    additions = steering_additions([vectors[s] for s, _, _ in rows], eps, row_blocks)
    responses = generate(model, tokenizer, [questions[q] for _, _, q in rows], additions, max_new_tokens,
                         system=system, positions=positions)
    return pd.DataFrame({"setting": [s for s, _, _ in rows], "coefficient": [c for _, c, _ in rows],
                         "question_id": [q for _, _, q in rows], "question": [questions[q] for _, _, q in rows],
                         "response": responses})
