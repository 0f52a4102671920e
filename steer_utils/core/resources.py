"""Resource guards: run batched work so that running out of memory halves the batch instead of ending a long run.

`halving_batches(run, items, batch_size, what)` calls `run(batch)` on consecutive batches of `items`. When a call
runs out of memory (torch.OutOfMemoryError, which CUDA raises, a RuntimeError saying so, as the CPU and MPS allocators
do, or a MemoryError), it halves the batch size, retries the failed batch in smaller pieces and goes on with the
smaller size. It warns once per call site (`what`) and process; the reduced size is remembered for that call site,
so later calls start there instead of running out of memory again. At batch size 1 it raises `OutOfMemory`.

A row's result does not depend on the other rows of its batch (up to float rounding, which batch sizes may change
on some devices): tests check that split and unsplit extraction agree and that greedy generation and SADI give the
same responses on CPU.

`registered_hooks()` is the other guard: the one place that removes forward hooks, on exit, error or a stop.
"""

from __future__ import annotations

import gc
import warnings
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")

_MESSAGES = ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory")
_limits: dict[str, int] = {}  # call site -> the largest batch size known to fit in this process
_warned: set[str] = set()


class OutOfMemory(MemoryError):
    """Out of memory even at batch size 1."""


class OutOfMemoryWarning(UserWarning):
    """A batch ran out of memory and was split."""


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is an allocation failure (CUDA, MPS or CPU) that a smaller batch may avoid."""
    try:
        import torch

        if isinstance(error, torch.OutOfMemoryError):
            return True
    except (ImportError, AttributeError):  # torch < 2.5 has only torch.cuda.OutOfMemoryError (a RuntimeError)
        pass
    if isinstance(error, OutOfMemory):
        return False  # already at batch size 1 further down
    if isinstance(error, MemoryError):  # Python's and numpy's allocation failures
        return True
    return isinstance(error, RuntimeError) and any(m in str(error).lower() for m in _MESSAGES)


def _free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def batch_limit(what: str) -> int | None:
    """The reduced batch size remembered for a call site, or None if it never ran out of memory."""
    return _limits.get(what)


def reset(what: str | None = None) -> None:
    """Forget the remembered batch sizes and warnings (of one call site, or all)."""
    if what is None:
        _limits.clear()
        _warned.clear()
    else:
        _limits.pop(what, None)
        _warned.discard(what)


def halving_batches(run: Callable[[Sequence[T]], R], items: Sequence[T], batch_size: int, what: str) -> list[R]:
    """`[run(batch) for batch in batches of items]`, halving the batch size whenever a batch runs out of memory.

    `what` names the call site (e.g. "extraction") in the warning and keys the remembered limit. Batches keep the
    order of `items`; a failed batch is retried in pieces of the new size, so the outputs cover every item once.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    size = min(batch_size, _limits.get(what, batch_size))
    outputs, start = [], 0
    while start < len(items):
        batch = items[start : start + size]
        failed = False
        try:
            outputs.append(run(batch))
        except Exception as error:  # only allocation failures are handled; the rest (and Ctrl-C) go up
            if not is_out_of_memory(error):
                raise
            if len(batch) == 1:
                raise OutOfMemory(
                    f"Out of memory in {what} even at batch size 1. Free memory (other processes on the device), "
                    f"use a smaller dtype (dtype='bfloat16'), shorter inputs or fewer new tokens, or a larger "
                    f"device."
                ) from error
            failed = True  # handled below, outside the except block, so the traceback's tensors can be freed
        if failed:
            new = max(1, len(batch) // 2)
            if what not in _warned:
                _warned.add(what)
                warnings.warn(
                    f"out of memory at batch size {len(batch)} in {what}; retrying with {new}",
                    OutOfMemoryWarning,
                    stacklevel=2,
                )
            size = new
            _limits[what] = min(_limits.get(what, new), new)
            _free_memory()
            continue
        start += len(batch)
    return outputs


@contextmanager
def registered_hooks() -> Iterator[list]:
    """A list to put hook handles in; every handle in it is removed on exit, even on error or a stop (the one place
    that removes hooks: steering, extraction, SADI and the bench's timers register theirs in it)."""
    handles: list = []
    try:
        yield handles
    finally:
        for handle in handles:
            handle.remove()
