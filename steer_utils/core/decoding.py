"""Greedy batched generation under active steering: one row per (vector, coefficient, question), shared prompt
prefixes run once, rows that loop stopped early, and the slow reference path (`model.generate`) it is tested against.

Loop stopping (on by default, `stop_loops=False` turns it off): once a row's last `LOOP_REPEATS` × p generated tokens
are one p-token cycle (p <= `LOOP_MAX_PERIOD`), the row leaves the batch and the rest of its `max_new_tokens` is the
cycle repeated, which is what greedy decoding gives for as long as the model stays in the loop. A response differs
from the full decode only where the model would have left the loop later (`make bench` measures how often).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterator, Sequence

import torch
from torch import nn

from .models import attention_implementation
from .prompting import render_prompt
from .protocol import check_positions
from .resources import halving_batches
from .steering import steer


def clean_response(text: str) -> str:
    """Strip whitespace, turn carriage returns into newlines (a bare '\\r' is not quoted by `to_csv` but splits
    rows in `read_csv`) and cut a plain-template continuation at the next 'User:' turn."""
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\nUser:")[0].strip()


# Generation-config fields that make `model.generate`'s greedy choice differ from the plain argmax.
_LOGITS_PROCESSING = (
    "repetition_penalty",
    "encoder_repetition_penalty",
    "no_repeat_ngram_size",
    "bad_words_ids",
    "sequence_bias",
    "suppress_tokens",
    "begin_suppress_tokens",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "min_length",
    "min_new_tokens",
    "exponential_decay_length_penalty",
)


def needs_logits_processing(model: nn.Module) -> bool:
    """Whether the model's generation config changes the logits before the greedy choice (then `generate` uses
    `model.generate`, which applies it, instead of `greedy_decode`)."""
    from transformers import GenerationConfig

    config, default = getattr(model, "generation_config", None), GenerationConfig()
    return config is not None and any(getattr(config, f, None) != getattr(default, f, None) for f in _LOGITS_PROCESSING)


LOOP_REPEATS, LOOP_MAX_PERIOD = 3, 16  # a loop: 3 repeats of a cycle of at most 16 tokens


def loop_start(
    ids: Sequence[int], repeats: int = LOOP_REPEATS, max_period: int = LOOP_MAX_PERIOD
) -> tuple[int, int] | None:
    """(t, p) for the first t at which the last `repeats` × p of ids[:t] are one p-token cycle (the smallest such p);
    None if the tokens never loop. The plain-Python reference of the decoder's vectorised check."""
    for t in range(2, len(ids) + 1):
        for p in range(1, max_period + 1):
            if repeats * p <= t and all(ids[t - 1 - i] == ids[t - 1 - i - p] for i in range((repeats - 1) * p)):
                return t, p
    return None


def fill_loop(ids: Sequence[int], length: int, stop_ids: Sequence[int] = ()) -> list[int]:
    """A full greedy continuation as loop stopping makes it: up to its first loop (`loop_start`; the tokens before
    its first stop token count), then the cycle repeated to `length` tokens; unchanged if it never loops."""
    stops = set(stop_ids)
    end = next((i for i, token in enumerate(ids) if token in stops), len(ids))
    start = loop_start(ids[:end])
    if start is None:
        return list(ids)
    t, p = start
    return list(ids[:t]) + [ids[t - p + i % p] for i in range(length - t)]


def looping_period(
    tokens: torch.Tensor, count: int, repeats: int = LOOP_REPEATS, max_period: int = LOOP_MAX_PERIOD
) -> torch.Tensor:
    """(rows,) the smallest period p whose `repeats` cycles end the first `count` columns of tokens (rows, >= count),
    0 where none does: `loop_start`'s test at t = count, for every row at once."""
    period = torch.zeros(len(tokens), dtype=torch.long, device=tokens.device)
    for p in range(min(max_period, count // repeats), 0, -1):  # descending, so the smallest p is written last
        window = tokens[:, count - repeats * p : count]  # (rows, repeats p)
        period[(window[:, p:] == window[:, :-p]).all(dim=1)] = p
    return period


def stop_token_ids(model: nn.Module, tokenizer) -> list[int]:
    """The tokens that end a response: the model's generation config's EOS id(s), else the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = tokenizer.eos_token_id if eos is None else eos
    return sorted({eos} if isinstance(eos, int) else set(eos or ()))


@dataclass(frozen=True)
class SharedPrefix:
    """The first `length` columns of a batch, computed once per group of rows (`group`: (rows,) ids 0..u-1).

    Rows of a group have the same tokens there and, if `steered`, the same hooks (the group's first row's hooks
    run on the shared pass); if not `steered` the shared pass runs without hooks, which is only right when the
    hooks leave those positions unchanged.
    """

    length: int
    group: torch.Tensor
    steered: bool


@torch.inference_mode()
def greedy_decode(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    pad_id: int,
    hooks: Callable[[torch.Tensor], ContextManager],
    prefix: SharedPrefix | None = None,
    stop_loops: bool = True,
) -> torch.Tensor:
    """Greedy continuations (rows, max_new_tokens) of padded prompts, `pad_id` after a row's stop token.

    The argmax of `model.generate(do_sample=False)`, without its per-step machinery and doing less work:
    - a row that has produced a stop token leaves the batch (its KV cache rows are dropped), so later steps
      compute only the rows still running (many responses end well before `max_new_tokens`);
    - with `prefix`, the prompts' first columns run once per group of identical rows and their keys and values
      are copied to every row of the group;
    - with `stop_loops`, a row that loops leaves the batch and its remaining columns repeat the cycle (module
      docstring), so the result is `fill_loop` of each row's full greedy continuation.
    Padding may sit anywhere in a prompt (positions count its real tokens, as `generate` does for left padding).
    `hooks(rows)` returns the context manager (forward hooks) for the batch rows `rows` (indices into the
    batch), entered around every forward pass.
    """
    from transformers import DynamicCache

    n = len(input_ids)
    device = input_ids.device
    tokens = torch.full((n, max_new_tokens), pad_id, dtype=torch.long, device=device)
    positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)  # (n, t)
    cache = DynamicCache(config=model.config)
    live = torch.arange(n, device=device)  # batch rows still running
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    step, step_positions = input_ids, positions
    if prefix is not None and 0 < prefix.length < input_ids.shape[1]:
        group, k = prefix.group.to(device), prefix.length
        first = torch.full((int(group.max()) + 1,), n, device=device).scatter_reduce(  # (u,) a row of each group
            0, group, torch.arange(n, device=device), "amin"
        )
        with hooks(first) if prefix.steered else nullcontext():
            model(
                input_ids=input_ids[first, :k],
                attention_mask=attention_mask[first, :k],
                position_ids=positions[first, :k],
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        cache.batch_select_indices(group)  # every row gets its group's keys and values
        step, step_positions = input_ids[:, k:], positions[:, k:]
    mask = attention_mask
    for t in range(max_new_tokens):
        with hooks(live):
            logits = model(
                input_ids=step,
                attention_mask=mask,
                position_ids=step_positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            ).logits[:, -1]  # (live, vocab)
        chosen = logits.argmax(-1)
        tokens[live, t] = chosen
        running = ~torch.isin(chosen, stops)
        if stop_loops and t + 1 < max_new_tokens:
            recent = min(t + 1, LOOP_REPEATS * LOOP_MAX_PERIOD)  # the columns the longest cycle's test reads
            period = looping_period(tokens[live, t + 1 - recent : t + 1], recent) * running  # (live,) 0: no loop
            for row, p in zip(live[period > 0].tolist(), period[period > 0].tolist()):
                rest = max_new_tokens - t - 1  # fill columns t+1.. with the cycle of tokens[t+1-p : t+1]
                tokens[row, t + 1 :] = tokens[row, t + 1 - p : t + 1].repeat((rest + p - 1) // p)[:rest]
            running &= period == 0
        if not running.all():
            if not running.any():
                break
            kept = running.nonzero().squeeze(1)
            cache.batch_select_indices(kept)
            live, chosen, mask, step_positions = live[kept], chosen[kept], mask[kept], step_positions[kept]
        step = chosen[:, None]
        mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
        step_positions = step_positions[:, -1:] + 1
    return tokens


def shared_layout(
    prompt_ids: Sequence[Sequence[int]], pad_id: int, additions: dict[int, torch.Tensor], positions: str
) -> tuple[torch.Tensor, torch.Tensor, SharedPrefix]:
    """Batch tensors (input_ids, attention_mask) of tokenized prompts and the prefix their rows share.

    positions='answer': prompts are left-padded; every position but the last is unsteered, so rows with the same
    prompt share all of it but the last token. positions='all': the tokens every prompt starts with (the chat
    template's system turn) come first, unpadded, then the left-padded rest; rows with the same additions share
    that part, steered.
    """
    n, width, first = len(prompt_ids), max(len(p) for p in prompt_ids), prompt_ids[0]
    common = 0  # answer positions: plain left padding
    if positions == "all":  # the longest start all prompts share, leaving at least one token of each unshared
        shortest = min(len(p) for p in prompt_ids) - 1
        common = next((i for i in range(shortest) if any(p[i] != first[i] for p in prompt_ids)), shortest)
    ids = torch.tensor([list(p[:common]) + [pad_id] * (width - len(p)) + list(p[common:]) for p in prompt_ids])
    mask = torch.tensor([[1] * common + [0] * (width - len(p)) + [1] * (len(p) - common) for p in prompt_ids])
    if positions == "answer":  # rows with the same prompt (padding included) share all of it but the last token
        _, group = torch.unique(torch.cat([ids[:, :-1], mask[:, :-1]], dim=1), dim=0, return_inverse=True)
        return ids, mask, SharedPrefix(width - 1, group, steered=False)
    rows = (
        torch.cat([a.float().expand(n, -1) for _, a in sorted(additions.items())], dim=1)
        if additions
        else torch.zeros(n, 1)
    )  # (n, blocks * d): one row's additions at every block
    _, group = torch.unique(rows, dim=0, return_inverse=True)
    return ids, mask, SharedPrefix(common, group, steered=True)


@torch.inference_mode()
def generate(
    model: nn.Module,
    tokenizer,
    user_messages: Sequence[str],
    additions: dict[int, torch.Tensor] | None = None,
    max_new_tokens: int = 50,
    row_context: Callable[[torch.Tensor], ContextManager] | None = None,
    system: str | None = None,
    positions: str = "all",
    stop_loops: bool = True,
) -> list[str]:
    """Greedy responses to chat-templated user messages, all in one batched call (SDPA attention), optionally steered.

    Decoded by `greedy_decode`: finished rows leave the batch, and without a `row_context` the work rows share
    (`shared_layout`) runs once. If the call runs out of memory, its rows are generated in halves (quarters, ...)
    instead (`resources.halving_batches`, warning once); every piece keeps the full batch's padding and its rows of
    the per-row additions, so the responses are the same. `row_context(rows)`, if given, returns a context manager
    that is active while the batch rows `rows` (a tensor of indices) run, e.g. SADI's per-row scales for those
    rows. `system` is the system message (see `prompting.render_prompt`); `positions` where the additions apply (see
    `steer`); `stop_loops` ends rows that loop (module docstring).
    """
    check_positions(positions)
    prompts = [render_prompt(tokenizer, m, system) for m in user_messages]
    device = next(model.parameters()).device
    n = len(prompts)
    additions = additions or {}
    processed = needs_logits_processing(model)
    if row_context is None and n and not processed:
        prompt_ids = tokenizer(prompts, add_special_tokens=False).input_ids
        input_ids, attention_mask, prefix = shared_layout(prompt_ids, tokenizer.pad_token_id, additions, positions)
    else:
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        input_ids, attention_mask, prefix = batch["input_ids"], batch["attention_mask"], None
    stop_ids = stop_token_ids(model, tokenizer)

    def run(rows: range) -> list[str]:
        ids, mask = input_ids[rows.start : rows.stop].to(device), attention_mask[rows.start : rows.stop].to(device)
        start = torch.tensor(rows.start)

        def hooks(live: torch.Tensor) -> ContextManager:  # live: rows of this piece still running
            shifts = {b: a[(live + start).cpu()] if a.dim() == 2 and len(a) == n else a for b, a in additions.items()}
            return _both(row_context(live + start) if row_context else nullcontext(), steer(model, shifts, positions))

        if processed:
            with hooks(torch.arange(len(ids))):
                out = model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    pad_token_id=tokenizer.pad_token_id,
                )[:, ids.shape[1] :]
            if stop_loops:  # the same responses as the fast path's, without its saving
                out = [fill_loop(row, max_new_tokens, stop_ids) for row in out.tolist()]
        else:
            piece = (
                None
                if prefix is None
                else SharedPrefix(
                    prefix.length,
                    torch.unique(prefix.group[rows.start : rows.stop], return_inverse=True)[1],
                    prefix.steered,
                )
            )
            out = greedy_decode(
                model, ids, mask, max_new_tokens, stop_ids, tokenizer.pad_token_id, hooks, piece, stop_loops
            )
        return tokenizer.batch_decode(out, skip_special_tokens=True)

    with attention_implementation(model, "sdpa"):
        parts = halving_batches(run, range(n), max(n, 1), "generation")
    return [clean_response(t) for part in parts for t in part]


@contextmanager
def _both(first: ContextManager, second: ContextManager) -> Iterator[None]:
    with first, second:
        yield


@torch.inference_mode()
def generate_reference(
    model: nn.Module,
    tokenizer,
    user_messages: Sequence[str],
    additions: dict[int, torch.Tensor] | None = None,
    max_new_tokens: int = 50,
    system: str | None = None,
    positions: str = "all",
    stop_loops: bool = True,
) -> list[str]:
    """`generate` the simple way, one `model.generate` call over every row (loops, if `stop_loops`, filled in after
    the full decode by `fill_loop`): the reference the fast path is tested and benchmarked against."""
    prompts = [render_prompt(tokenizer, m, system) for m in user_messages]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    device = next(model.parameters()).device
    with attention_implementation(model, "sdpa"), steer(model, additions or {}, positions):
        out = model.generate(
            **{k: v.to(device) for k, v in batch.items()},
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=tokenizer.pad_token_id,
        )
    out = out[:, batch["input_ids"].shape[1] :].tolist()
    if stop_loops:
        out = [fill_loop(row, max_new_tokens, stop_token_ids(model, tokenizer)) for row in out]
    return [clean_response(t) for t in tokenizer.batch_decode(out, skip_special_tokens=True)]
