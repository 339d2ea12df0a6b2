"""spense-prune end to end on a tiny random Llama: the checkpoint's invariants, resume, and bad input."""

from __future__ import annotations

import hashlib
import re
import json
import pathlib

import pytest
import torch

from tests.conftest import TINY_PRUNE_ARGS
from vllm_spense.checkpoint import read_config, read_tensors, spense_layers
from vllm_spense.format import GROUP_SIZE, PackedSpenseWeight, unpack, validate
from vllm_spense.offline import cli, pruner
from vllm_spense.offline.evaluate import load_spense_as_dense
from vllm_spense.offline.writer import CheckpointWriter

TARGETS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj"]


def tensor_hashes(folder: pathlib.Path) -> dict[str, str]:
    return {k: hashlib.sha256(v.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest() + str(v.dtype)
            for k, v in read_tensors(folder).items()}


def test_checkpoint_invariants(tiny_model_dir, tiny_checkpoint):
    config, quant = read_config(tiny_checkpoint)
    assert config["quantization_config"]["quant_method"] == "spense"
    assert "compressed-tensors" not in json.dumps(config)
    assert quant.dense_fraction == 0.25 and quant.chunk_size == 64  # TINY_PRUNE_ARGS asks for 64
    tensors = read_tensors(tiny_checkpoint)
    original = read_tensors(tiny_model_dir)
    expected_layers = [f"model.layers.{i}.{t}" for i in range(2) for t in TARGETS]
    assert spense_layers(tensors) == sorted(expected_layers)
    for layer in expected_layers:
        packed = PackedSpenseWeight.from_tensors(layer, tensors)
        n, k = original[f"{layer}.weight"].shape
        validate(packed, quant.chunk_size, layer, expected_shape=(n, k))
        weight = unpack(packed).view(n, k // GROUP_SIZE, GROUP_SIZE)
        nonzero = (weight != 0).sum(-1)
        assert (nonzero[:, ~packed.dense_mask] <= 2).all(), layer  # the 2:4 invariant
        assert (nonzero[:, ~packed.dense_mask] == 2).float().mean() > 0.99
        assert (nonzero[:, packed.dense_mask] == 4).all(), layer  # dense groups are never pruned
        per_chunk = packed.dense_mask.view(-1, quant.chunk_size // GROUP_SIZE).sum(1)
        assert (per_chunk == quant.chunk_size // GROUP_SIZE // 4).all()  # rho = 0.25 in every chunk
        # Compensation moved the kept weights: they are not the original values.
        assert not torch.equal(weight.reshape(n, k)[:, :8], original[f"{layer}.weight"][:, :8])
    for i in range(2):  # merged layers share one layout
        mask = lambda t: tensors[f"model.layers.{i}.{t}.dense_mask"]
        assert torch.equal(mask("self_attn.q_proj"), mask("self_attn.k_proj"))
        assert torch.equal(mask("self_attn.q_proj"), mask("self_attn.v_proj"))
        assert torch.equal(mask("mlp.gate_proj"), mask("mlp.up_proj"))
        assert not torch.equal(mask("self_attn.q_proj"), mask("mlp.down_proj")[:32])
    untouched = [k for k in original if not any(k == f"{layer}.weight" for layer in expected_layers)]
    assert "lm_head.weight" in untouched and "model.layers.0.self_attn.q_proj.bias" in untouched
    for key in untouched:
        assert torch.equal(tensors[key], original[key]), key
    assert (tiny_checkpoint / "tokenizer.json").is_file()
    assert not tiny_checkpoint.with_name(tiny_checkpoint.name + ".partial").exists()


def test_checkpoint_runs_densely_in_transformers(tiny_model_dir, tiny_checkpoint):
    """The rebuilt model computes x @ W^T with exactly the stored weights: compare one layer by hand."""
    model, _ = load_spense_as_dense(tiny_checkpoint)
    tensors = read_tensors(tiny_checkpoint)
    layer = "model.layers.1.mlp.down_proj"
    x = torch.randn(5, 384)
    expected = x.double() @ unpack(PackedSpenseWeight.from_tensors(layer, tensors)).double().t()
    torch.testing.assert_close(model.model.layers[1].mlp.down_proj(x).double(), expected, rtol=1e-5, atol=1e-5)
    ids = torch.randint(0, 512, (2, 33))
    assert torch.isfinite(model(ids).logits).all()


def test_resume_after_crash_is_bit_identical(tiny_model_dir, tiny_checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "resumed"
    args = [str(tiny_model_dir), "--out", str(out), *TINY_PRUNE_ARGS]
    real_save = CheckpointWriter.save_layer

    def crash_at_layer_1(self, index, tensors, next_inputs):
        if index == 1:
            raise KeyboardInterrupt("simulated crash")
        real_save(self, index, tensors, next_inputs)

    monkeypatch.setattr(CheckpointWriter, "save_layer", crash_at_layer_1)
    with pytest.raises(KeyboardInterrupt):
        cli.main(args)
    assert not out.exists()  # never half-written
    partial = out.with_name("resumed.partial")
    assert (partial / "model-00001-of-00003.safetensors").is_file()

    monkeypatch.setattr(CheckpointWriter, "save_layer", real_save)
    pruned_layers = []
    real_collect = pruner.collect_hessians
    monkeypatch.setattr(pruner, "collect_hessians",
                        lambda layer, *a, **k: pruned_layers.append(layer) or real_collect(layer, *a, **k))
    assert cli.main(args) == 0
    assert len(pruned_layers) == 1  # only the unfinished layer ran again
    assert not partial.exists()
    assert tensor_hashes(out) == tensor_hashes(tiny_checkpoint)  # same seed, same bits, crash or not


def make_gpt2_model(folder: pathlib.Path) -> pathlib.Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.conftest import train_tokenizer

    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=512, n_positions=128)).save_pretrained(
        str(folder))
    train_tokenizer().save_pretrained(str(folder))
    return folder


def _run_cli(args, capsys):
    code = cli.main(args)
    return code, capsys.readouterr().err


def test_bad_command_lines_exit_2_and_write_nothing(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    short_text = tmp_path / "short.txt"
    short_text.write_text("To be, or not to be.")
    not_a_model = tmp_path / "notes.txt"
    not_a_model.write_text("hello")
    no_linear = make_gpt2_model(tmp_path / "gpt2")  # GPT-2 blocks use transformers' Conv1D, not nn.Linear
    cases = [
        ([str(tmp_path / "missing")], "does not exist"),
        ([str(not_a_model)], "is not a model"),
        ([str(tiny_model_dir), "--dense-fraction", "1.0"], "--dense-fraction must be in \\[0, 1\\)"),
        ([str(tiny_model_dir), "--dense-fraction", "-0.125"], "--dense-fraction must be in \\[0, 1\\)"),
        ([str(no_linear)], "has no Linear layers inside its decoder layers"),
        ([str(tiny_model_dir), "--dense-fraction", "0.3"], "no chunk size .* divides every input width"),
        ([str(tiny_model_dir), "--chunk-size", "256"], "not multiples of --chunk-size 256"),
        ([str(tiny_model_dir), "--calibration", str(short_text)], "at least 65 are needed"),
        ([str(tiny_model_dir), "--method", "wanda"], "plain 2:4 baseline"),
        ([str(tiny_model_dir), "--target-bytes", "0.4"], "--target-bytes must be in \\[0.5312, 1\\): plain 2:4"),
        ([str(tiny_model_dir), "--allocation", "adaptive", "--method", "sparsegpt", "--dense-budget", "0"],
         "--allocation adaptive spends a dense budget"),
    ]
    for extra, message in cases:
        code, err = _run_cli([*extra, "--out", str(out), "--nsamples", "4", "--seqlen", "64", "--device", "cpu"],
                             capsys)
        assert code == 2, (extra, err)
        last = err.strip().splitlines()[-1]  # transformers may print progress bars before it
        assert last.startswith("spense-prune: error: ")
        assert re.search(message, last), (message, last)
        assert not out.exists() and not out.with_name("out.partial").exists()


def test_existing_output_and_foreign_partial_are_refused(tiny_model_dir, tiny_checkpoint, tmp_path, capsys):
    code, err = _run_cli([str(tiny_model_dir), "--out", str(tiny_checkpoint), *TINY_PRUNE_ARGS], capsys)
    assert code == 2 and "already exists" in err
    out = tmp_path / "other"
    partial = tmp_path / "other.partial"
    partial.mkdir()
    (partial / "run.json").write_text(json.dumps({"model": "something else"}))
    code, err = _run_cli([str(tiny_model_dir), "--out", str(out), *TINY_PRUNE_ARGS], capsys)
    assert code == 2 and "unfinished run with other settings" in err
    assert not out.exists()


def test_chunk_size_defaults_to_the_largest_that_fits(tiny_model_dir):
    from vllm_spense.offline.models import load_model

    model, _ = load_model(tiny_model_dir)
    assert pruner.resolve_chunk_size(model, pruner.PruneRecipe(dense_fraction=0.25)) == 128  # widths 128, 384
    assert pruner.resolve_chunk_size(model, pruner.PruneRecipe(dense_fraction=0.25, chunk_size=64)) == 64


def test_sigkill_mid_run_then_rerun_gives_the_same_bits(tmp_path):
    """A real kill (no Python cleanup runs): the rerun resumes and matches an uninterrupted run bit for bit."""
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import make_tiny_model

    model = make_tiny_model(tmp_path / "deep", layers=6)
    command = [sys.executable, "-m", "vllm_spense.offline", str(model), *TINY_PRUNE_ARGS, "--nsamples", "32",
               "--seqlen", "128"]
    reference = tmp_path / "reference"
    subprocess.run([*command, "--out", str(reference)], check=True, capture_output=True)
    out = tmp_path / "killed"
    partial = tmp_path / "killed.partial"
    process = subprocess.Popen([*command, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    second_layer = partial / "model-00002-of-00007.safetensors"
    deadline = time.monotonic() + 300
    while not second_layer.exists():
        assert process.poll() is None, "the pruner finished or died before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not out.exists() and partial.is_dir()  # never a half-written output folder
    left = sorted(p.name for p in partial.glob("model-*.safetensors"))
    assert "model-00006-of-00007.safetensors" not in left, f"killed too late to test a resume: {left}"
    subprocess.run([*command, "--out", str(out)], check=True, capture_output=True)
    assert not partial.exists()
    assert tensor_hashes(out) == tensor_hashes(reference)
