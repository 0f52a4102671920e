"""Steering: add eps * ||h_l|| * v_l to the output of chosen blocks at every position, and generate.

eps is relative to the block's typical hidden-state norm (`ConceptVector.norms`), so one coefficient
grid serves models whose activation scales differ. Several vectors and coefficients run in one batched
`generate` call: each row of the batch carries its own addition.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import pandas as pd
import torch
from torch import nn

from .data import render_prompt
from .extraction import block_output, find_blocks
from .vectors import ConceptVector


def default_blocks(n_blocks: int) -> list[int]:
    """All blocks but the first (the paper's default)."""
    return list(range(1, n_blocks))


def steering_additions(vectors: Sequence[ConceptVector], coefficients: Sequence[float],
                       blocks: Sequence[int]) -> dict[int, torch.Tensor]:
    """Per-row additions {block: (rows, d)} = coefficient_r * norm_rl * v_rl, one row per (vector, coefficient)."""
    if len(vectors) != len(coefficients):
        raise ValueError(f"Got {len(vectors)} vectors for {len(coefficients)} coefficients; give one per row.")
    if not len(coefficients):
        raise ValueError("The coefficient grid is empty; give at least one coefficient.")
    additions = {}
    for block in blocks:
        missing = [i for i, v in enumerate(vectors) if block not in v.directions]
        if missing:
            raise ValueError(f"Block {block} has no direction in vector(s) {missing}; choose blocks the vectors cover.")
        additions[block] = torch.stack([c * v.norms[block] * v.directions[block].float()
                                        for v, c in zip(vectors, coefficients)])
    return additions


@contextmanager
def steer(model: nn.Module, additions: dict[int, torch.Tensor]) -> Iterator[None]:
    """While active, block l's output h becomes h + additions[l] at every position.

    additions[l] is (d,) for the whole batch or (batch, d) per row. Hooks are removed on exit, even on error.
    """
    blocks = find_blocks(model)
    handles = []

    def make_hook(delta: torch.Tensor):
        def hook(module, args, output):
            hidden = block_output(output)
            shift = delta.to(hidden.device, hidden.dtype)
            steered = hidden + (shift[:, None, :] if shift.dim() == 2 else shift)  # broadcast over positions
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
    """Strip whitespace and cut a plain-template continuation at the next 'User:' turn."""
    return text.split("\nUser:")[0].strip()


@torch.inference_mode()
def generate(model: nn.Module, tokenizer, user_messages: Sequence[str], additions: dict[int, torch.Tensor] | None = None,
             max_new_tokens: int = 50) -> list[str]:
    """Greedy responses to chat-templated user messages, all in one batched call, optionally steered."""
    prompts = [render_prompt(tokenizer, m) for m in user_messages]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    batch = {k: v.to(next(model.parameters()).device) for k, v in batch.items()}
    with steer(model, additions or {}):
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             pad_token_id=tokenizer.pad_token_id)
    return [clean_response(t) for t in tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)]


def generate_grid(model: nn.Module, tokenizer, vectors: dict[str, ConceptVector], questions: Sequence[str],
                  coefficients: Sequence[float], blocks: Sequence[int], max_new_tokens: int = 50) -> pd.DataFrame:
    """Every (setting, coefficient, question) of one concept in one `generate` call; one row each."""
    rows = [(s, c, q) for s in vectors for c in coefficients for q in range(len(questions))]
    additions = steering_additions([vectors[s] for s, _, _ in rows], [c for _, c, _ in rows], blocks)
    responses = generate(model, tokenizer, [questions[q] for _, _, q in rows], additions, max_new_tokens)
    return pd.DataFrame({"setting": [s for s, _, _ in rows], "coefficient": [c for _, c, _ in rows],
                         "question_id": [q for _, _, q in rows], "question": [questions[q] for _, _, q in rows],
                         "response": responses})
