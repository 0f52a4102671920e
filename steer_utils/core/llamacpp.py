"""A concept vector as a llama.cpp control vector (GGUF), so `llama-cli` steers a model as `vector.apply` does.

`ConceptVector.save("x.gguf")` and `ConceptVector.load("x.gguf")` call `write_control_vector` and
`read_control_vector`; this module knows the file format only (plain dicts of blocks), not the vector class.

The file llama.cpp reads: GGUF with `general.architecture = "controlvector"` and one 1-D float32 tensor
`direction.N` per steered layer, N in llama.cpp's layer numbering. `--control-vector-scaled FILE:EPS` adds
EPS * direction.N to the output of layer N at every position, so each tensor holds norms[b] * directions[b]
(the addition per unit coefficient) and EPS is the same eps as in `vector.apply(model, eps)`.

Layer numbering, checked in llama.cpp's source (ggml-org/llama.cpp, read file by file; the commits are those of
the versions read):
- common/common.cpp @ 00758e06b449: `common_control_vector_load_one` parses the N of `direction.N`, refuses N < 0
  and N == 0 ("invalid (zero) direction tensor layer index"), non-F32 and non-1-D tensors, multiplies each value
  by the file's scale (`src[j] * load_info.strength`) and stores layer N at offset n_embd * (N - 1).
  `common_control_vector_load` sums several files; `common_init_from_params` defaults the layer range to
  [1, llama_model_n_layer(model)].
- src/llama-adapter.cpp @ 0650ea8c05bc: `llama_adapter_cvec::init` makes tensors[0] = nullptr ("there's never a
  tensor for layer 0") and one tensor per il in 1 .. n_layer - 1; `llama_adapter_cvec::apply` copies offset
  n_embd * (il - 1) into tensors[il]; `tensor_for(il)` returns tensors[il] inside [layer_start, layer_end];
  `apply_to(ctx, cur, il)` adds it to cur.
- src/llama-graph.cpp: `llm_graph_context::build_cvec(cur, il)` calls `cvec->apply_to(ctx0, cur, il)`.
- src/models/llama.cpp @ 069be0ae22f3, qwen2.cpp @ 0215468f0add, gemma3.cpp @ 569a0092b98e: in the loop
  `for (int il = 0; il < n_layer; ++il)` over decoder layers, `cur = build_cvec(cur, il)` comes right after the
  FFN residual add and before `cb(cur, "l_out", il)`: the output of 0-based decoder layer il.
- common/arg.cpp @ 0017d6fb63f9: `--control-vector-scaled FNAME:SCALE,...` (older builds: `FNAME SCALE`).
- tools/cvector-generator/cvector-generator.cpp @ 0704760b031d: `export_gguf` writes `controlvector.model_hint`
  (string, the model's general.architecture) and `controlvector.layer_count` (int32, the number of tensors);
  the loader above reads neither.
So direction.N is added to the output of `model.model.layers[N]`: llama.cpp's N is our 0-based block, and block 0
is the one block llama.cpp cannot steer.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import numpy as np
import torch

from ..cache import atomic_write

ARCHITECTURE = "controlvector"  # general.architecture of a control vector file
NAMESPACE = "steer_utils"  # our own keys, which llama.cpp ignores: metadata, norms, unit directions
FORMAT_VERSION = 1


def _check(directions: dict[int, torch.Tensor], norms: dict[int, float], metadata: dict[str, str]) -> None:
    """Raise a clear ValueError unless llama.cpp can add what `vector.apply` adds."""
    if not directions:
        raise ValueError("The vector has no blocks; give it at least one steered block (1 or above).")
    sizes = set()
    for block, direction in directions.items():
        if isinstance(block, bool) or not isinstance(block, int):
            raise ValueError(f"Block keys must be ints (0-based decoder layers), got {block!r}.")
        if block < 1:
            raise ValueError(
                f"Block {block} cannot be steered by llama.cpp: it never adds direction.0 (its loader refuses it and "
                "it keeps no tensor for layer 0) and has no negative layers. Drop the block, e.g. "
                "ConceptVector({b: v for b, v in vector.directions.items() if b >= 1}, vector.norms, vector.metadata), "
                "or steer blocks 1 and above (the protocols' default, default_blocks) so that apply() "
                "and llama.cpp add the same thing."
            )
        if direction.dim() != 1:
            raise ValueError(f"Block {block}'s direction has shape {tuple(direction.shape)}; it must be (d,).")
        if not torch.isfinite(direction.float()).all():
            raise ValueError(f"Block {block}'s direction contains NaN or inf; refit the vector.")
        if block not in norms:
            raise ValueError(f"Block {block} has a direction but no norm; give norms for every steered block.")
        sizes.add(direction.numel())
    if len(sizes) != 1:
        raise ValueError(f"The directions have different sizes {sorted(sizes)}; llama.cpp needs one hidden size.")
    for block, norm in norms.items():
        if isinstance(block, bool) or not isinstance(block, int):
            raise ValueError(f"Norm keys must be ints (0-based decoder layers), got {block!r}.")
        if not math.isfinite(float(norm)):
            raise ValueError(f"Block {block}'s norm is {norm!r}; norms must be finite numbers.")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("Metadata must map strings to strings (as ConceptVector.save needs too).")


def write_control_vector(
    path: Path,
    directions: dict[int, torch.Tensor],
    norms: dict[int, float],
    metadata: dict[str, str],
    model_hint: str | None = None,
) -> Path:
    """Write a vector's unit `directions` (block -> (d,)) and `norms` as a llama.cpp control vector (atomically)."""
    _check(directions, norms, metadata)
    path = Path(path)
    hint = model_hint if model_hint is not None else metadata.get("model", "unknown")
    writer = gguf.GGUFWriter(None, ARCHITECTURE)  # adds general.architecture = "controlvector"
    string = gguf.GGUFValueType.STRING  # add_key_value, not add_string: add_string skips empty strings
    writer.add_key_value(f"{ARCHITECTURE}.model_hint", hint, string)
    writer.add_int32(f"{ARCHITECTURE}.layer_count", len(directions))  # as llama-cvector-generator writes it
    writer.add_key_value(f"{NAMESPACE}.format_version", str(FORMAT_VERSION), string)
    writer.add_key_value(f"{NAMESPACE}.metadata", json.dumps(metadata), string)
    # Norms keyed by our 0-based block; JSON floats round-trip exactly. Every norm, also of unsteered blocks.
    writer.add_key_value(f"{NAMESPACE}.norms", json.dumps({str(b): float(n) for b, n in sorted(norms.items())}), string)
    for block in sorted(directions):
        unit = directions[block].detach().float().cpu()  # (d,)
        # The unit direction as a float32 array key, so the reader returns it bit for bit (tensor / norm would not).
        writer.add_array(f"{NAMESPACE}.unit_direction.{block}", unit.tolist())
        addition = (float(norms[block]) * unit).numpy().astype(np.float32)  # (d,): per unit coefficient
        writer.add_tensor(f"direction.{block}", addition)  # llama.cpp's layer N is our block N (above)

    def write(tmp: str) -> None:
        try:
            writer.write_header_to_file(Path(tmp))
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()

    atomic_write(path, write)
    return path


def _field(reader: gguf.GGUFReader, key: str):
    """The value of a key-value field, or None where the file lacks it."""
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def read_control_vector(path: Path) -> tuple[dict[int, torch.Tensor], dict[int, float], dict[str, str]]:
    """(directions, norms, metadata) of a llama.cpp control vector file (ours, or another tool's), in our blocks."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"No control vector file at {path}; check the path, or write one with vector.save('{path}')."
        )
    try:
        reader = gguf.GGUFReader(path)
    except Exception as error:  # bad magic, empty or truncated file: the reader raises assorted errors
        raise ValueError(
            f"{path} is not a readable GGUF file ({error}); pass a control vector written by ConceptVector.save "
            "or llama-cvector-generator."
        ) from error
    architecture = _field(reader, "general.architecture")
    if architecture != ARCHITECTURE:
        raise ValueError(
            f"{path} is a GGUF file of architecture {architecture!r}, not a llama.cpp control vector "
            f"({ARCHITECTURE!r}); pass the control vector file (written by ConceptVector.save), not a model."
        )

    additions = {}  # block -> (d,) float32: norms[b] * directions[b]
    for tensor in reader.tensors:
        prefix, _, number = tensor.name.partition(".")
        if prefix != "direction" or not number.isdigit() or int(number) == 0:
            raise ValueError(
                f"{path} holds tensor {tensor.name!r}; llama.cpp accepts only direction.N with N >= 1 and would "
                "skip this file. Re-export the vector with ConceptVector.save."
            )
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32 or len(tensor.shape) != 1:
            raise ValueError(
                f"{path}: {tensor.name} is {tensor.tensor_type.name} of shape {list(tensor.shape)}; llama.cpp needs "
                "1-D float32 tensors. Re-export the vector with ConceptVector.save."
            )
        additions[int(number)] = torch.tensor(np.array(tensor.data, dtype=np.float32))  # copy: no memmap
    if not additions:
        raise ValueError(
            f"{path} is a control vector without direction tensors; re-export the vector with ConceptVector.save."
        )

    if _field(reader, f"{NAMESPACE}.norms") is None:
        # Another tool's file: the tensor is the addition per unit scale, so norm = its length, direction = unit.
        norms = {b: float(a.norm()) for b, a in additions.items()}
        directions = {b: a / norms[b] if norms[b] > 0 else a for b, a in additions.items()}
        hint = _field(reader, f"{ARCHITECTURE}.model_hint")
        metadata = {"source": f"llama.cpp control vector {path.name}"} | ({"model_hint": hint} if hint else {})
        return dict(sorted(directions.items())), dict(sorted(norms.items())), metadata

    version = _field(reader, f"{NAMESPACE}.format_version")
    if version != str(FORMAT_VERSION):
        raise ValueError(
            f"{path} has steer_utils format version {version!r}; this code reads {FORMAT_VERSION}. "
            "Update steer_utils, or re-export the vector with this version's ConceptVector.save."
        )
    metadata = json.loads(_field(reader, f"{NAMESPACE}.metadata"))
    norms = {int(b): n for b, n in json.loads(_field(reader, f"{NAMESPACE}.norms")).items()}
    directions = {}
    for block, addition in sorted(additions.items()):
        unit = _field(reader, f"{NAMESPACE}.unit_direction.{block}")
        if unit is None or block not in norms or len(unit) != len(addition):
            raise ValueError(
                f"{path}: block {block} lacks its stored norm or unit direction; re-export with ConceptVector.save."
            )
        directions[block] = torch.tensor(unit, dtype=torch.float32)
        # The tensor llama.cpp adds must still be norm * unit: catches a file rescaled or edited after it was saved.
        if not torch.allclose(addition, norms[block] * directions[block], rtol=1e-5, atol=1e-6 * abs(norms[block])):
            raise ValueError(
                f"{path}: direction.{block} is not norm * unit direction of block {block}; the "
                "file was changed after it was saved. Re-export the vector with ConceptVector.save."
            )
    return directions, dict(sorted(norms.items())), metadata
