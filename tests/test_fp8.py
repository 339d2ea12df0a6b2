"""FP8 Spense checkpoints: values on the e4m3 grid with per-output-channel scales (docs/FORMAT.md).

The grid check is independent of torch's cast: e4m3 keeps 3 mantissa bits, so a rounded normal value is
within 2^-4 of the original relative to it, and x / scale survives a second cast unchanged.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import random_dense_mask, random_pruned_weight
from vllm_spense.checkpoint import check_checkpoint_headers, read_config
from vllm_spense.format import (FP8_MAX, SpenseFormatError, SpenseQuantConfig, fp8_round, fp8_scales, pack, unpack,
                                validate)
from vllm_spense.offline.sparsegpt import sparsify_weight

FP8 = torch.float8_e4m3fn


def on_fp8_grid(weight: torch.Tensor, scale: torch.Tensor) -> bool:
    """Every weight / scale is an e4m3 value, up to the float32 rounding of the product weight = q * scale."""
    scaled = weight.double() / scale.double()[:, None]
    snapped = scaled.float().to(FP8).double()
    return bool((scaled.abs() <= FP8_MAX * (1 + 1e-6)).all() and ((scaled - snapped).abs() <= 1e-6 * snapped.abs()).all())


def test_fp8_round_is_nearest_on_the_e4m3_grid(generator):
    weight = torch.randn(37, 200, generator=generator) * torch.rand(37, 1, generator=generator) * 3
    scale = fp8_scales(weight)
    rounded = fp8_round(weight, scale)
    assert on_fp8_grid(rounded, scale)
    assert torch.equal(fp8_round(rounded, scale), rounded)  # rounding twice changes nothing
    assert torch.allclose(rounded.abs().amax(1), weight.abs().amax(1))  # each row's largest lands on 448
    normal = (weight / scale[:, None]).abs() >= 2.0 ** -6  # e4m3's smallest normal
    relative = ((rounded - weight).abs() / weight.abs())[normal]
    assert relative.max() <= 2.0 ** -4 + 1e-6


@pytest.mark.parametrize("n,k,chunk,dense", [(37, 256, 128, 8), (8, 64, 64, 0)])
def test_fp8_pack_unpack_is_exact_and_validated(n, k, chunk, dense, generator):
    mask = random_dense_mask(k, chunk, dense, generator)
    weight = random_pruned_weight(n, k, mask, generator)
    scale = fp8_scales(weight)
    on_grid = fp8_round(weight, scale)
    packed = pack(on_grid, mask, chunk, weight_scale=scale)
    assert packed.dense_weight.dtype == FP8 and packed.sparse_weight.dtype == FP8
    assert packed.weight_scale.dtype == torch.float32 and packed.weight_scale.shape == (n,)
    assert torch.equal(unpack(packed), on_grid)
    assert validate(packed, chunk, "l", value_dtype=FP8) == dense
    assert set(packed.tensors("l")) == {"l.dense_weight", "l.sparse_weight", "l.sparse_meta", "l.dense_mask",
                                        "l.weight_scale"}


def test_fp8_layer_errors_name_the_tensor(generator):
    mask = random_dense_mask(128, 128, 8, generator)
    weight = random_pruned_weight(16, 128, mask, generator)
    scale = fp8_scales(weight)
    packed = pack(fp8_round(weight, scale), mask, 128, weight_scale=scale)
    with pytest.raises(SpenseFormatError, match=r"l.dense_weight: expected dtype in \['torch.float16'.*float8"):
        validate(packed, 128, "l")  # FP8 tensors in a checkpoint that declares no weight_dtype
    bf16 = pack(weight.bfloat16(), mask, 128)
    with pytest.raises(SpenseFormatError, match=r"l.weight_scale: a weight_scale needs"):
        validate(bf16._replace(weight_scale=scale), 128, "l")
    with pytest.raises(SpenseFormatError, match=r"missing tensor l.weight_scale"):
        validate(packed._replace(weight_scale=None), 128, "l", value_dtype=FP8)
    with pytest.raises(SpenseFormatError, match=r"l.weight_scale: expected torch.float32 of shape \[16\]"):
        validate(packed._replace(weight_scale=scale[:8]), 128, "l", value_dtype=FP8)
    with pytest.raises(SpenseFormatError, match=r"finite and positive"):
        validate(packed._replace(weight_scale=-scale), 128, "l", value_dtype=FP8)
    with pytest.raises(SpenseFormatError, match=r"l.dense_weight: expected dtype in \['torch.float8_e4m3fn'\]"):
        validate(bf16, 128, "l", value_dtype=FP8)


def test_weight_dtype_round_trips_and_bad_values_are_refused():
    config = SpenseQuantConfig(dense_fraction=0.25, weight_dtype="float8_e4m3fn")
    assert SpenseQuantConfig.from_dict(config.to_dict()) == config
    assert config.stored_value_dtype == FP8
    assert "weight_dtype" not in SpenseQuantConfig(dense_fraction=0.25).to_dict()
    with pytest.raises(SpenseFormatError, match="weight_dtype must be one of"):
        SpenseQuantConfig(dense_fraction=0.25, weight_dtype="int4")


def _hessian_loss(weight: torch.Tensor, result: torch.Tensor, hessian: torch.Tensor) -> float:
    error = (result - weight).double()
    return float(((error @ hessian.double()) * error).sum())


def test_rounding_inside_the_obs_sweep_is_compensated(generator):
    """With every group dense the sweep only rounds (GPTQ-style): compensating each column's rounding
    error must beat rounding every weight to nearest with the same scales, on correlated inputs. With a
    2:4 region the joint result stays on the grid and 2:4."""
    compensated, nearest = 0.0, 0.0
    for _ in range(3):
        weight = torch.randn(48, 128, generator=generator)
        mixing = torch.eye(128) + 0.3 * torch.randn(128, 128, generator=generator)
        x = torch.randn(512, 128, generator=generator) @ mixing
        hessian = x.t() @ x / 512
        scale = fp8_scales(weight)
        quantize = lambda column: fp8_round(column[:, None], scale)[:, 0]  # noqa: E731
        everything_dense = torch.ones(32, dtype=torch.bool)
        joint = sparsify_weight(weight, hessian, dense_mask=everything_dense, quantize=quantize).weight
        assert on_fp8_grid(joint, scale)
        compensated += _hessian_loss(weight, joint, hessian)
        nearest += _hessian_loss(weight, fp8_round(weight, scale), hessian)
        mask = random_dense_mask(128, 64, 4, generator)
        pruned = sparsify_weight(weight, hessian, dense_mask=mask, quantize=quantize).weight
        assert on_fp8_grid(pruned, scale)
        assert ((pruned.reshape(48, -1, 4)[:, ~mask, :] != 0).sum(-1) <= 2).all()
    assert compensated < nearest


def test_spense_prune_writes_an_fp8_checkpoint_that_loads_dense(fp8_checkpoint, tiny_checkpoint):
    from vllm_spense.offline.evaluate import load_spense_as_dense

    config, quant = read_config(fp8_checkpoint)
    assert quant.weight_dtype == "float8_e4m3fn" and quant.pruning["fp8_compensation"] == "obs"
    layers = check_checkpoint_headers(fp8_checkpoint, quant)
    assert layers
    model, _ = load_spense_as_dense(fp8_checkpoint)
    reference, _ = load_spense_as_dense(tiny_checkpoint)  # the same recipe without FP8
    index = json.loads((fp8_checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    assert f"{layers[0]}.weight_scale" in index
    tokens = torch.randint(0, config["vocab_size"], (2, 24))
    with torch.no_grad():
        logits = model(tokens).logits.float()
        expected = reference(tokens).logits.float()
    assert torch.isfinite(logits).all()
    # FP8 rounding moves the logits a little, far less than their spread.
    assert (logits - expected).norm() / expected.norm() < 0.1


def test_w8a8_evaluation_rounds_each_linear_input_per_token_and_cleans_up(tiny_model_dir, generator):
    from vllm_spense.offline.models import decoder_layers, load_model, target_linears
    from vllm_spense.offline.quality import fp8_activations

    model, _ = load_model(tiny_model_dir)
    linear = next(iter(target_linears(decoder_layers(model)[0]).values()))
    seen = []
    linear.register_forward_hook(lambda module, args, out: seen.append(args[0].detach().reshape(-1, args[0].shape[-1])))
    tokens = torch.randint(0, model.config.vocab_size, (2, 7), generator=generator)
    with torch.no_grad(), fp8_activations(model):
        model(tokens)
    with torch.no_grad():
        model(tokens)
    rounded, raw = seen
    assert on_fp8_grid(rounded, fp8_scales(raw))  # each token on the grid of its own largest magnitude
    assert not torch.equal(rounded, raw)
    assert ((rounded - raw).abs() <= 2.0 ** -4 * raw.abs() + fp8_scales(raw)[:, None] * 2.0 ** -9).all()
