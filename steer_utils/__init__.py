"""steer_utils: attention-guided feature learning for steering LLMs (arXiv 2602.00333).

Three wings: `core/` is the paper's method (torch, no pandas), `experiments/` one backend per notebook and what they
share, `tools/` the make targets (bench, report, shards); `api.py`, `paths.py` and `cache.py` sit above them.
Notebooks in `notebooks/` only call these and plot. The public API, in five lines:

    from steer_utils import load_model, train_concept_vector, generate
    model, tokenizer, _ = load_model("smollm2-135m")
    vector = train_concept_vector(model, tokenizer, "fears/heights")
    with vector.apply(model, 0.035):
        print(generate(model, tokenizer, "What should I do this weekend?", protocol=vector))

The API names load lazily (PEP 562), so `import steer_utils.cache` and `python -m steer_utils.cache` start without
torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public name -> the module that defines it, imported on first access.
_EXPORTS = {
    "load_model": "core.models",
    "train_concept_vector": "api",
    "generate": "api",
    "parse_concept": "api",
    "ConceptVector": "core.vectors",
    "Protocol": "core.protocol",
    "ADOPTED": "core.protocol",
    "PAPER": "core.protocol",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    """Import a public API name on first use."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
