"""A concept vector exported as a llama.cpp control vector (GGUF) and read back: fast, no model."""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from steer_utils.core.vectors import ConceptVector, steering_additions


def save_gguf(vector: ConceptVector, path: Path, model_hint: str | None = None) -> Path:
    """`vector.save` to a .gguf path, returning the path."""
    vector.save(path, model_hint)
    return path


D = 16
BLOCKS = (1, 3, 5)  # 1: the first block llama.cpp can steer (it never steers block 0)


def make_vector(blocks=BLOCKS, seed: int = 0) -> ConceptVector:
    """Seeded unit directions (D,) with distinct norms per block, and metadata as the pipeline writes it."""
    generator = torch.Generator().manual_seed(seed)
    directions = {}
    for block in blocks:
        draw = torch.randn(D, generator=generator)
        directions[block] = draw / draw.norm()
    norms = {b: 10.0 + 2.5 * b + 0.1234567 for b in blocks}
    metadata = {"model": "smollm2-135m", "concept": "heights", "method": "rfm", "note": 'ünïcode, "quotes"'}
    return ConceptVector(directions, norms, metadata)


def test_file_is_a_llamacpp_control_vector(tmp_path):
    vector = make_vector()
    path = save_gguf(vector, tmp_path / "concept.gguf", model_hint="llama")
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == "controlvector"
    assert reader.fields["controlvector.model_hint"].contents() == "llama"
    assert reader.fields["controlvector.layer_count"].contents() == len(BLOCKS)
    tensors = {t.name: t for t in reader.tensors}
    assert sorted(tensors) == [f"direction.{b}" for b in BLOCKS]  # llama.cpp's N is our 0-based block
    for block in BLOCKS:
        tensor = tensors[f"direction.{block}"]
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32 and list(tensor.shape) == [D]
        expected = (vector.norms[block] * vector.directions[block]).numpy()
        np.testing.assert_array_equal(np.asarray(tensor.data), expected)


def test_llamacpp_adds_what_apply_adds(tmp_path):
    """llama.cpp adds scale * direction.N to layer N's output; ours adds eps * norm * direction to block N's output."""
    vector, eps = make_vector(), 0.035
    reader = gguf.GGUFReader(save_gguf(vector, tmp_path / "concept.gguf"))
    theirs = {int(t.name.split(".")[1]): eps * torch.tensor(np.asarray(t.data)) for t in reader.tensors}
    ours = {b: rows[0] for b, rows in steering_additions([vector], [eps], list(BLOCKS)).items()}
    assert theirs.keys() == ours.keys()
    for block in BLOCKS:
        torch.testing.assert_close(theirs[block], ours[block], rtol=1e-6, atol=0)


def test_round_trip_is_exact(tmp_path):
    vector = make_vector(blocks=(1, 2, 7, 29))
    vector.norms[0] = 3.0  # a norm without a direction (block 0 is not steered) still round-trips
    loaded = ConceptVector.load(save_gguf(vector, tmp_path / "sub" / "concept.gguf"))
    assert loaded.metadata == vector.metadata
    assert loaded.norms == vector.norms
    assert list(loaded.directions) == sorted(vector.directions)
    for block, direction in vector.directions.items():
        assert loaded.directions[block].dtype == torch.float32
        assert torch.equal(loaded.directions[block], direction)


def test_model_hint_defaults_to_the_model_name(tmp_path):
    reader = gguf.GGUFReader(save_gguf(make_vector(), tmp_path / "concept.gguf"))
    assert reader.fields["controlvector.model_hint"].contents() == "smollm2-135m"


def test_another_tools_control_vector_loads_with_its_lengths_as_norms(tmp_path):
    """A file without our keys (e.g. llama-cvector-generator's): norm = tensor length, direction = unit vector."""
    path = tmp_path / "foreign.gguf"
    writer = gguf.GGUFWriter(path, "controlvector")
    writer.add_string("controlvector.model_hint", "qwen2")
    writer.add_int32("controlvector.layer_count", 2)
    addition = {1: np.full(D, 0.5, dtype=np.float32), 2: np.arange(D, dtype=np.float32)}
    for layer, values in addition.items():
        writer.add_tensor(f"direction.{layer}", values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    loaded = ConceptVector.load(path)
    assert loaded.metadata["model_hint"] == "qwen2"
    for block, values in addition.items():
        torch.testing.assert_close(loaded.norms[block] * loaded.directions[block], torch.from_numpy(values))
        torch.testing.assert_close(loaded.directions[block].norm(), torch.tensor(1.0))


@pytest.mark.parametrize("block", [0, -1])
def test_refuses_a_block_llamacpp_cannot_steer(tmp_path, block):
    vector = make_vector(blocks=(block, 1, 3))
    with pytest.raises(ValueError, match="cannot be steered by llama.cpp.*Drop the block"):
        save_gguf(vector, tmp_path / "concept.gguf")
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_refuses_inconsistent_vectors(tmp_path):
    vector = make_vector()
    del vector.norms[3]
    with pytest.raises(ValueError, match="Block 3 has a direction but no norm"):
        save_gguf(vector, tmp_path / "a.gguf")
    vector = make_vector()
    vector.directions[5] = torch.ones(D + 1)
    with pytest.raises(ValueError, match="different sizes"):
        save_gguf(vector, tmp_path / "b.gguf")
    with pytest.raises(ValueError, match="no blocks"):
        save_gguf(ConceptVector({}, {}), tmp_path / "c.gguf")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="No control vector file at .*vector.save"):
        ConceptVector.load(tmp_path / "nowhere.gguf")


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "vector.gguf"
    path.write_bytes(b"this is not a GGUF file at all")
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        ConceptVector.load(path)


def test_a_model_gguf_is_not_a_control_vector(tmp_path):
    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, D), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="architecture 'llama', not a llama.cpp control vector"):
        ConceptVector.load(path)


def test_a_file_llamacpp_would_skip_is_refused(tmp_path):
    path = tmp_path / "zero.gguf"
    writer = gguf.GGUFWriter(path, "controlvector")
    writer.add_tensor("direction.0", np.ones(D, dtype=np.float32))  # llama.cpp: "invalid (zero) ... layer index"
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="direction.0.*direction.N with N >= 1"):
        ConceptVector.load(path)


def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    path = tmp_path / "concept.gguf"
    path.write_bytes(b"the previous file")

    def broken(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_gguf(make_vector(), path)
    assert os.listdir(tmp_path) == ["concept.gguf"]  # no temporary file left
    assert path.read_bytes() == b"the previous file"  # the old file is untouched
