"""Dense budgets: the greedy allocation against brute force, the byte model against packed tensors, and
spense-prune --allocation adaptive / --target-bytes end to end on the tiny model."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math

import pytest
import torch

from tests.conftest import TINY_PRUNE_ARGS
from tests.helpers import random_dense_mask, random_pruned_weight
from vllm_spense.checkpoint import check_checkpoint_headers, dense_state_dict, read_config, read_tensors
from vllm_spense.format import (GROUP_SIZE, SpenseFormatError, SpenseQuantConfig, dense_fraction_for_bytes, pack,
                                stored_bytes_ratio)
from vllm_spense.offline import cli
from vllm_spense.offline.allocation import LayerSensitivity, adaptive_plan, measure_sensitivity, suffix_loss
from vllm_spense.offline.evaluate import perplexity
from vllm_spense.offline.models import ModelSourceError, decoder_layers, load_model
from vllm_spense.offline.pruner import PruneError, PruneRecipe, _run_layer, capture_layer_inputs


def random_layers(generator, count: int, same_size: bool) -> list[LayerSensitivity]:
    layers = []
    for i in range(count):
        weights = 4096 if same_size else int(torch.randint(1, 9, (1,), generator=generator)) * 1024
        rise = float(torch.rand(1, generator=generator)) * 10 ** float(torch.randint(-3, 0, (1,), generator=generator))
        decay = 0.5 + 3 * float(torch.rand(1, generator=generator))
        layers.append(LayerSensitivity((f"layers.{i}.q_proj", f"layers.{i}.down_proj"), weights, rise, decay))
    return layers


def modelled_loss(layers, dense, groups_per_chunk):
    return sum(s.loss_rise * math.exp(-s.decay * d / groups_per_chunk) for s, d in zip(layers, dense))


def spent(layers, dense, groups_per_chunk):
    return sum(s.weights * d / groups_per_chunk for s, d in zip(layers, dense))


@pytest.mark.parametrize("trial", range(4))
def test_adaptive_plan_is_optimal_for_equal_sized_layers(trial, generator):
    """Equal sizes: greedy must match exhaustive search over every plan of the format's steps."""
    chunk, gpc = 32, 8  # 0, 2, 4 or 6 dense groups per chunk
    layers = random_layers(generator, 4, same_size=True)
    budget = float(torch.rand(1, generator=generator)) * 0.7
    plan = adaptive_plan(layers, budget, chunk)
    dense = [plan[s.linears[0]] for s in layers]
    assert all(plan[s.linears[1]] == plan[s.linears[0]] for s in layers)  # one fraction per layer
    allowed = budget * sum(s.weights for s in layers) + 1e-6
    best = min(modelled_loss(layers, combo, gpc) for combo in itertools.product(range(0, gpc, 2), repeat=4)
               if spent(layers, combo, gpc) <= allowed)
    assert spent(layers, dense, gpc) <= allowed
    assert modelled_loss(layers, dense, gpc) == pytest.approx(best, rel=1e-9)


@pytest.mark.parametrize("trial", range(4))
def test_adaptive_plan_spends_the_budget_and_follows_the_rises(trial, generator):
    chunk, gpc = 64, 16
    layers = random_layers(generator, 12, same_size=False)
    budget = 0.05 + float(torch.rand(1, generator=generator)) * 0.6
    plan = adaptive_plan(layers, budget, chunk)
    dense = [plan[s.linears[0]] for s in layers]
    left = budget * sum(s.weights for s in layers) - spent(layers, dense, gpc)
    assert left >= -1e-6
    for s, d in zip(layers, dense):
        assert d % 2 == 0 and 0 <= d <= gpc - 2
        if d < gpc - 2:  # nothing left undone: every layer below the cap has a next step that does not fit
            assert s.weights * 2 / gpc > left
    # A layer whose loss rise grows never gets fewer dense groups.
    boosted = [dataclasses.replace(s, loss_rise=s.loss_rise * 50) if i == 0 else s for i, s in enumerate(layers)]
    assert adaptive_plan(boosted, budget, chunk)[layers[0].linears[0]] >= dense[0]


def test_sensitivity_pass_measures_and_restores(sensitive_tiny_dir):
    """On a tiny model whose first layer is scaled up: it must rise most, and the model comes back unchanged."""
    model = load_model(sensitive_tiny_dir)[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calibration = torch.randint(0, 512, (8, 64), generator=torch.Generator().manual_seed(0))
    layers = measure_sensitivity(model, calibration, PruneRecipe(dense_fraction=0.25), 64,
                                 device=torch.device("cpu"), batch_size=4)
    assert [s.linears[0] for s in layers] == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert all(len(s.linears) == 7 and s.weights == 196608 and s.decay > 0 for s in layers)
    assert layers[0].loss_rise > max(layers[1].loss_rise, 0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_sensitivity_pass_refuses_a_head_it_cannot_run(sensitive_tiny_dir, monkeypatch):
    """A model whose loss is not decoder layers + final norm + output embeddings gets a clear error."""
    model = load_model(sensitive_tiny_dir)[0]
    calibration = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(1))
    args = (model, calibration, PruneRecipe(dense_fraction=0.25), 64)
    head = model.get_output_embeddings()
    other = torch.nn.Linear(head.in_features, head.out_features, bias=False)
    monkeypatch.setattr(model, "get_output_embeddings", lambda: other)
    with pytest.raises(ModelSourceError, match=r"LlamaForCausalLM's loss from its decoder layers.*is not the model's"):
        measure_sensitivity(*args, device=torch.device("cpu"), batch_size=4)
    monkeypatch.setattr(model.model, "norm", None)
    with pytest.raises(ModelSourceError, match="LlamaForCausalLM has no final `norm`"):
        measure_sensitivity(*args, device=torch.device("cpu"), batch_size=4)


def test_suffix_loss_is_the_models_loss(sensitive_tiny_dir, generator):
    """From any layer's cached input, the rest of the model gives the full model's mean token loss."""
    model = load_model(sensitive_tiny_dir)[0]
    windows = torch.randint(0, 512, (5, 37), generator=generator)
    inputs, kwargs = capture_layer_inputs(model, windows, torch.device("cpu"))
    expected = math.log(perplexity(model, windows))
    for start in range(len(decoder_layers(model))):
        assert suffix_loss(model, start, inputs, windows, kwargs, batch_size=2) == pytest.approx(expected, rel=1e-5)
        inputs = _run_layer(decoder_layers(model)[start], inputs, kwargs, batch_size=3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("dense_per_chunk", [0, 4, 10])
def test_stored_bytes_ratio_matches_packed_tensors(dtype, dense_per_chunk, generator):
    n, k, chunk = 37, 384, 64
    mask = random_dense_mask(k, chunk, dense_per_chunk, generator)
    packed = pack(random_pruned_weight(n, k, mask, generator, dtype), mask, chunk)
    stored = sum(t.nbytes for t in (packed.dense_weight, packed.sparse_weight, packed.sparse_meta))
    rho = dense_per_chunk * GROUP_SIZE / chunk
    assert stored / (n * k * dtype.itemsize) == pytest.approx(stored_bytes_ratio(rho, dtype.itemsize), abs=1e-12)
    assert dense_fraction_for_bytes(stored_bytes_ratio(rho, dtype.itemsize), dtype.itemsize) == pytest.approx(rho)


def test_target_bytes_gives_the_largest_budget_that_fits():
    assert stored_bytes_ratio(0.25, 2) == pytest.approx(0.671875)
    adaptive = cli.budget_for_target_bytes(0.7, 2, "adaptive", 64)
    assert stored_bytes_ratio(adaptive, 2) == pytest.approx(0.7)
    uniform = cli.budget_for_target_bytes(0.7, 2, "uniform", 64)  # steps of 0.125 at chunk 64
    assert uniform == 0.25 and stored_bytes_ratio(uniform + 0.125, 2) > 0.7
    assert cli.budget_for_target_bytes(stored_bytes_ratio(0.375, 2), 2, "uniform", 64) == pytest.approx(0.375)
    for bad in (0.5, 1.0):
        with pytest.raises(PruneError, match="--target-bytes must be in \\[0.5625, 1\\)"):
            cli.budget_for_target_bytes(bad, 2, "uniform", 64)


def test_quant_config_per_layer_fractions():
    layer = "model.layers.0.mlp.down_proj"
    config = SpenseQuantConfig(dense_fraction=0.25, chunk_size=64, dense_fractions={layer: 0.5})
    assert SpenseQuantConfig.from_dict(config.to_dict()) == config
    assert config.layer_dense_groups_per_chunk(layer) == 8
    assert config.layer_dense_groups_per_chunk("model.layers.0.mlp.up_proj") == 4
    assert "dense_fractions" not in SpenseQuantConfig(dense_fraction=0.25).to_dict()
    for fractions, message in [([0.5], "dense_fractions must be an object"),
                               ({layer: 1.0}, f"dense_fractions\\['{layer}'\\] must be a number in \\[0, 1\\)"),
                               ({layer: "0.5"}, "must be a number"),
                               ({layer: 0.0625}, f"dense_fractions\\['{layer}'\\]: .* use a multiple of 0.125")]:
        with pytest.raises(SpenseFormatError, match=message):
            SpenseQuantConfig.from_dict({**config.to_dict(), "dense_fractions": fractions})
    odd = SpenseQuantConfig(dense_fraction=0.3, chunk_size=64)
    with pytest.raises(SpenseFormatError, match=f"layer {layer}: quantization_config gives it no dense_fractions"):
        odd.layer_dense_groups_per_chunk(layer)


def test_adaptive_checkpoint_holds_mixed_fractions_within_budget(tiny_adaptive_checkpoint, sensitive_tiny_dir):
    config, quant = read_config(tiny_adaptive_checkpoint)
    fractions = quant.dense_fractions
    assert config["quantization_config"]["pruning"]["allocation"] == "adaptive"
    assert len(fractions) == 14 and len(set(fractions.values())) > 1  # mixed
    for i in range(2):
        attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        assert fractions[f"{attn}.q_proj"] == fractions[f"{attn}.k_proj"] == fractions[f"{attn}.v_proj"]
        assert fractions[f"{mlp}.gate_proj"] == fractions[f"{mlp}.up_proj"]
    tensors = read_tensors(tiny_adaptive_checkpoint)
    original = read_tensors(sensitive_tiny_dir)
    dense = total = 0
    for layer, fraction in fractions.items():
        n, k = original[f"{layer}.weight"].shape
        mask = tensors[f"{layer}.dense_mask"]
        assert mask.view(-1, 16).sum(1).eq(round(fraction * 16)).all(), layer  # balanced at its own fraction
        dense += n * int(mask.sum()) * GROUP_SIZE
        total += n * k
    step = total / 2 * 2 / 16  # two dense groups per 64-channel chunk over one of the two layers
    assert 0.25 * total - step < dense <= 0.25 * total  # the budget, spent to within one step
    assert fractions["model.layers.0.mlp.down_proj"] > fractions["model.layers.1.mlp.down_proj"]
    assert config["quantization_config"]["pruning"]["dense_share"] == pytest.approx(dense / total, abs=1e-6)
    check_checkpoint_headers(tiny_adaptive_checkpoint, quant)
    state = dense_state_dict(tiny_adaptive_checkpoint)[2]
    for layer in fractions:  # the 2:4 invariant outside each layer's own dense groups
        nonzero = state[f"{layer}.weight"].view(original[f"{layer}.weight"].shape[0], -1, GROUP_SIZE).ne(0).sum(-1)
        mask = tensors[f"{layer}.dense_mask"]
        assert (nonzero[:, ~mask] <= 2).all() and (nonzero[:, mask] == 4).all(), layer


def test_config_fraction_that_disagrees_with_tensors_is_rejected(tiny_adaptive_checkpoint, tmp_path):
    import shutil

    from tests.helpers import edit_config

    folder = tmp_path / "broken"
    shutil.copytree(tiny_adaptive_checkpoint, folder)
    fractions = read_config(folder)[1].dense_fractions
    layer = "model.layers.1.mlp.down_proj"
    other = 0.5 if fractions[layer] != 0.5 else 0.25
    edit_config(folder, lambda c: c["quantization_config"]["dense_fractions"].update({layer: other}))
    message = (f"layer {layer}, tensor {layer}.dense_weight: quantization_config gives this layer dense fraction "
               f"{other} \\({round(other * 16)} dense groups per 64-channel chunk\\), its tensors hold")
    with pytest.raises(SpenseFormatError, match=message):
        check_checkpoint_headers(folder, read_config(folder)[1])
    with pytest.raises(SpenseFormatError, match=message):
        dense_state_dict(folder)
    edit_config(folder, lambda c: c["quantization_config"]["dense_fractions"].update(
        {layer: fractions[layer], "model.layers.7.mlp.down_proj": 0.25}))
    with pytest.raises(SpenseFormatError, match="names layers with no Spense tensors: \\['model.layers.7"):
        check_checkpoint_headers(folder, read_config(folder)[1])


def test_target_bytes_end_to_end(tiny_model_dir, tmp_path):
    out = tmp_path / "bytes"
    args = [a for a in TINY_PRUNE_ARGS if a not in ("--dense-fraction", "0.25")]
    assert cli.main([str(tiny_model_dir), "--out", str(out), *args, "--target-bytes", "0.7",
                     "--save-dtype", "bfloat16", "--allocation", "adaptive"]) == 0
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["pruning"]["target_bytes"] == 0.7
    tensors = read_tensors(out)
    layers = config["dense_fractions"]
    stored = sum(tensors[f"{layer}.{t}"].nbytes for layer in layers
                 for t in ("dense_weight", "sparse_weight", "sparse_meta"))
    dense_bytes = sum(tensors[f"{layer}.dense_weight"].shape[0] * tensors[f"{layer}.dense_mask"].numel() * 4 * 2
                      for layer in layers)
    assert stored_bytes_ratio(0.25, 2) < stored / dense_bytes <= 0.7  # more of the target than uniform's 0.25
