"""Shared fixtures: a tiny fast tokenizer and a tiny random llama model, built in the test."""

from __future__ import annotations

import pytest
import torch

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_tokenizer(chat_template: str | None = CHATML):
    """A byte-level BPE tokenizer trained on the statements and prefixes (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from steer_utils.core import prompting
    from steer_utils.experiments import data

    texts = data.load_statements() + [
        prompting.prefix_text(c, x) for c in prompting.CLASSES for x in data.load_concepts(c)
    ]
    texts += ["User: Assistant: system user assistant " + prompting.STATEMENT_TEMPLATE]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<|im_start|>", eos_token="<|im_end|>"
    )
    tokenizer.chat_template = chat_template
    tokenizer.padding_side = "left"
    return tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """Tiny tokenizer with a ChatML template."""
    return build_tiny_tokenizer()


def tiny_config_fields(tokenizer) -> dict:
    """The sizes every tiny random model shares: hidden 32, MLP 64, 4 heads and 2 kv heads, 256 positions."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )


def save_tiny_llama(folder, initializer_range: float = 0.02):
    """Save a 2-block random llama model + tokenizer (no chat template) into `folder`; returns it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = build_tiny_tokenizer(chat_template=None)
    config = LlamaConfig(**tiny_config_fields(tokenizer), num_hidden_layers=2, initializer_range=initializer_range)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved 2-block random llama model + tokenizer (no chat template), loadable as a local path."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def sharp_model_dir(tmp_path_factory):
    """The tiny llama with 15x larger random weights: peaked attention and hidden states of ~20, so positions
    matter as in a trained model (with the default init a one-position shift moves a state by under one bf16 ulp)."""
    return save_tiny_llama(tmp_path_factory.mktemp("sharp-llama"), initializer_range=0.3)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """(model, tokenizer, info) of the tiny random llama in fp32 on the CPU, loaded once per test module."""
    from steer_utils.core import models

    return models.load_model(str(tiny_model_dir), dtype="float32", device="cpu")
