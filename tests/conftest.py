"""Shared fixtures: a tiny random Llama with its own small tokenizer, and a Spense checkpoint of it."""

from __future__ import annotations

import os
import pathlib

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run in the interpreter on CPU machines (must be set before any kernel is defined).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from vllm_spense.offline.calibration import CALIBRATION_GENRES, read_text, shakespeare_files

# 64-channel chunks so the tiny model also splits over two tensor-parallel ranks (o_proj: K = 128).
TINY_PRUNE_ARGS = ["--nsamples", "8", "--seqlen", "64", "--dense-fraction", "0.25", "--chunk-size", "64",
                   "--device", "cpu"]


def train_tokenizer(vocab_size: int = 512):
    """A byte-level BPE trained on two plays: no hub, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([read_text(shakespeare_files(CALIBRATION_GENRES)[:2])], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")
    fast.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}<s>assistant: {% endif %}")
    return fast


def make_tiny_model(folder: pathlib.Path, *, attention_bias: bool = True, seed: int = 0, layers: int = 2,
                    first_layer_scale: float = 1.0) -> pathlib.Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=384, num_attention_heads=4,
                         num_key_value_heads=2, num_hidden_layers=layers, attention_bias=attention_bias,
                         tie_word_embeddings=False, max_position_embeddings=256, bos_token_id=0, eos_token_id=1)
    model = LlamaForCausalLM(config).eval()
    for param in model.parameters():
        param.data.normal_(0, 0.05)
    for linear in model.model.layers[0].modules():  # a first layer that matters more than the second
        if isinstance(linear, torch.nn.Linear):
            linear.weight.data.mul_(first_layer_scale)
    model.save_pretrained(str(folder), safe_serialization=True)
    train_tokenizer().save_pretrained(str(folder))
    return folder


@pytest.fixture
def generator():
    """Fresh random draws every run (the seed is in the failure's locals)."""
    return torch.Generator().manual_seed(torch.seed() % 2**31)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> pathlib.Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def broken(tiny_checkpoint, tmp_path) -> pathlib.Path:
    """A fresh copy of the tiny checkpoint for a test to corrupt."""
    import shutil

    folder = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, folder)
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_model_dir, tmp_path_factory) -> pathlib.Path:
    from vllm_spense.offline.cli import main

    out = tmp_path_factory.mktemp("tiny-spense") / "checkpoint"
    assert main([str(tiny_model_dir), "--out", str(out), *TINY_PRUNE_ARGS]) == 0
    return out


def sensitive_tiny_model_dir(folder: pathlib.Path) -> pathlib.Path:
    """The tiny model with its first layer's Linears scaled up 3x: pruning that layer costs more."""
    return make_tiny_model(folder, first_layer_scale=3.0)


@pytest.fixture(scope="session")
def sensitive_tiny_dir(tmp_path_factory) -> pathlib.Path:
    return sensitive_tiny_model_dir(tmp_path_factory.mktemp("sensitive") / "model")


@pytest.fixture(scope="session")
def tiny_adaptive_checkpoint(sensitive_tiny_dir, tmp_path_factory) -> pathlib.Path:
    """An adaptive dense budget over the sensitive tiny model: its layers hold different dense fractions."""
    from vllm_spense.offline.cli import main

    out = tmp_path_factory.mktemp("tiny-adaptive") / "checkpoint"
    assert main([str(sensitive_tiny_dir), "--out", str(out), *TINY_PRUNE_ARGS, "--allocation", "adaptive"]) == 0
    return out


@pytest.fixture(scope="session")
def fp8_checkpoint(tiny_model_dir, tmp_path_factory) -> pathlib.Path:
    """The tiny checkpoint's recipe with FP8 values (--weight-dtype fp8)."""
    from vllm_spense.offline.cli import main

    out = tmp_path_factory.mktemp("tiny-fp8") / "checkpoint"
    assert main([str(tiny_model_dir), "--out", str(out), *TINY_PRUNE_ARGS, "--weight-dtype", "fp8"]) == 0
    return out
