"""How many dense groups each matrix gets: uniform, or adaptive under one model-wide budget.

A *dense plan* maps every targeted Linear (full module name) to its dense groups per chunk (even, below
``chunk_size / 4``). ``uniform`` gives every matrix ``budget * chunk_size / 4``.

``adaptive`` gives each decoder layer its own fraction, from a first pass over the *dense* model on the
calibration windows (never the evaluation text), in the spirit of OWL (Yin et al., 2024) but measured end to
end rather than read from outlier counts:

- ``loss_rise``: each decoder layer alone is pruned to plain 2:4 (SparseGPT on the dense model's inputs)
  and the rise of the model's loss on the first ``SENSITIVITY_WINDOWS`` calibration windows is recorded,
  running only that layer and those after it on their cached dense inputs (``suffix_loss``);
- ``decay``: how fast a dense region shrinks the error, from the same pass: over every layer's inputs, the
  OBS error with a budget-sized dense region over the plain 2:4 error, ``exp(-decay * rho)`` (on a row
  sample), one value for the whole model.

A layer's loss rise is modelled as ``loss_rise * exp(-decay * rho)``; ``adaptive_plan`` spends the budget,
two dense groups per chunk at a time, where that modelled loss falls most per dense weight. Every Linear of a
layer gets the layer's fraction, so layers vLLM merges (q/k/v, gate/up) share one by construction.
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
import math
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from vllm_spense.format import GROUP_SIZE, dense_groups_per_chunk
from vllm_spense.offline.models import ModelSourceError, decoder_layers, target_linears

if TYPE_CHECKING:
    from vllm_spense.offline.pruner import PruneRecipe

logger = logging.getLogger(__name__)

ALLOCATIONS = ("uniform", "adaptive")
DensePlan = dict[str, int]  # Linear name -> dense groups per chunk
SENSITIVITY_WINDOWS = 16  # calibration windows the loss rises are measured on
DECAY_ROWS = 256  # rows per matrix sampled for the decay's OBS sweeps


@dataclasses.dataclass
class LayerSensitivity:
    """One decoder layer: its Linears, their weight count, the loss rise measured when it alone is pruned to
    plain 2:4, and the decay its modelled rise falls with as it gets denser (one model-wide value today)."""

    linears: tuple[str, ...]
    weights: int
    loss_rise: float
    decay: float


def linear_names(model: nn.Module) -> list[str]:
    names = {module: name for name, module in model.named_modules()}
    return [f"{names[layer]}.{name}" for layer in decoder_layers(model) for name in target_linears(layer)]


def uniform_plan(model: nn.Module, budget: float, chunk_size: int) -> DensePlan:
    dense = dense_groups_per_chunk(budget, chunk_size)
    return dict.fromkeys(linear_names(model), dense)


def dense_plan(model: nn.Module, calibration: torch.Tensor, recipe: "PruneRecipe", chunk_size: int, *,
               device: torch.device, batch_size: int) -> DensePlan:
    """The recipe's plan: uniform, or adaptive after the sensitivity pass on ``calibration``."""
    if recipe.allocation == "uniform" or recipe.dense_fraction == 0:
        return uniform_plan(model, recipe.dense_fraction, chunk_size)
    layers = measure_sensitivity(model, calibration, recipe, chunk_size, device=device, batch_size=batch_size)
    return adaptive_plan(layers, recipe.dense_fraction, chunk_size)


@torch.no_grad()
def measure_sensitivity(model: nn.Module, calibration: torch.Tensor, recipe: "PruneRecipe", chunk_size: int, *,
                        device: torch.device, batch_size: int) -> list[LayerSensitivity]:
    """The first pass (module docstring). The whole model runs on ``device`` for the loss passes."""
    from vllm_spense.offline.evaluate import perplexity
    from vllm_spense.offline.pruner import _run_layer, capture_layer_inputs, collect_hessians
    from vllm_spense.offline.selection import balanced_top_groups
    from vllm_spense.offline.sparsegpt import sparsify_weight

    names = {module: name for name, module in model.named_modules()}
    inputs, kwargs = capture_layer_inputs(model, calibration, device)
    model.to(device)
    windows = calibration[:SENSITIVITY_WINDOWS].to(device)
    base = suffix_loss(model, 0, inputs[:SENSITIVITY_WINDOWS], windows, kwargs, batch_size)
    full = math.log(perplexity(model, windows))
    if not math.isclose(base, full, rel_tol=1e-4):
        raise ModelSourceError(f"--allocation adaptive: {type(model).__name__}'s loss from its decoder layers, final "
                               f"norm and output embeddings ({base:.6f}) is not the model's ({full:.6f}); the "
                               f"sensitivity pass supports models whose head is just these (Llama, Qwen, Mistral)")
    groups_per_chunk = chunk_size // GROUP_SIZE
    probe = min(groups_per_chunk - 2, max(2, 2 * round(recipe.dense_fraction * groups_per_chunk / 2)))
    generator = torch.Generator().manual_seed(recipe.seed)
    rises, log_ratios = [], []  # per layer: (its Linears, their weight count, its loss rise)
    for index, layer in enumerate(tqdm(decoder_layers(model), desc="sensitivity", unit="layer")):
        prefix = names[layer]
        linears = target_linears(layer)
        pruned = {}
        for group, hessian in collect_hessians(layer, inputs, kwargs, batch_size).items():
            plain = {name: sparsify_weight(linears[name].weight, hessian, order="natural", blocksize=recipe.blocksize,
                                           damp=recipe.damp, layer=f"{prefix}.{name}") for name in group}
            pruned.update({name: result.weight for name, result in plain.items()})
            mask = balanced_top_groups(sum(result.group_loss for result in plain.values()), chunk_size, probe)
            with_dense = plain_loss = 0.0
            for name in group:
                weight = linears[name].weight
                rows = torch.randperm(weight.shape[0], generator=generator)[:DECAY_ROWS].to(weight.device)
                sample = weight[rows]
                plain_loss += sparsify_weight(sample, hessian, order="natural", blocksize=recipe.blocksize,
                                              damp=recipe.damp).loss
                with_dense += sparsify_weight(sample, hessian, dense_mask=mask, order="dense-last",
                                              blocksize=recipe.blocksize, damp=recipe.damp).loss
            if plain_loss > 0 and with_dense > 0:
                log_ratios.append(math.log(with_dense / plain_loss))
        rise = _loss_with(model, linears, pruned, index, inputs, windows, kwargs, batch_size) - base
        rises.append((tuple(f"{prefix}.{name}" for name in linears),
                      sum(linear.weight.numel() for linear in linears.values()), rise))
        inputs = _run_layer(layer, inputs, kwargs, batch_size)
    model.to("cpu")
    # One model-wide decay: per-layer decays, from OBS errors or end to end, measured worse (docs/QUALITY.md).
    # No OBS error anywhere (an all-zero model): any decay is as good.
    decay = -sum(log_ratios) / len(log_ratios) / (probe * GROUP_SIZE / chunk_size) if log_ratios else 1.0
    logger.info("sensitivity: loss rises %s, decay %.3g", [round(rise, 4) for *_, rise in rises], decay)
    return [LayerSensitivity(*entry, decay) for entry in rises]


def _loss_with(model: nn.Module, linears: dict[str, nn.Linear], weights: dict[str, torch.Tensor], index: int,
               inputs: torch.Tensor, windows: torch.Tensor, kwargs: dict, batch_size: int) -> float:
    """``suffix_loss`` with layer ``index``'s Linears holding ``weights``; the model comes back unchanged."""
    original = {name: linears[name].weight.detach().clone() for name in weights}
    try:
        for name, weight in weights.items():
            linears[name].weight.copy_(weight)
        return suffix_loss(model, index, inputs[:windows.shape[0]], windows, kwargs, batch_size)
    finally:
        for name, weight in original.items():
            linears[name].weight.copy_(weight)


@torch.no_grad()
def suffix_loss(model: nn.Module, start: int, hidden: torch.Tensor, windows: torch.Tensor, kwargs: dict,
                batch_size: int) -> float:
    """Mean next-token loss on ``windows``, running only decoder layers ``start..`` and the head on ``hidden``
    (the windows' dense input to layer ``start``): a change to one layer needs no pass through those before it."""
    norm, head = getattr(model.get_decoder(), "norm", None), model.get_output_embeddings()
    if norm is None or head is None:
        raise ModelSourceError(f"{type(model).__name__} has no final `norm` beside its decoder layers or no output "
                               f"embeddings: the adaptive allocation's sensitivity pass cannot run its last layers")
    layers = decoder_layers(model)
    total = 0.0
    for begin in range(0, hidden.shape[0], batch_size):
        state = hidden[begin:begin + batch_size]
        for layer in layers[start:]:
            out = layer(state, **kwargs)
            state = out[0] if isinstance(out, tuple) else out
        logits = head(norm(state))[:, :-1].float()
        tokens = windows[begin:begin + batch_size, 1:]
        total += float(nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1),
                                                   reduction="sum"))
    return total / windows[:, 1:].numel()


def adaptive_plan(layers: list[LayerSensitivity], budget: float, chunk_size: int) -> DensePlan:
    """Per-layer dense groups per chunk minimising ``sum(rise_i * exp(-decay_i * rho_i))`` under the budget.

    Greedy: the next step (two dense groups per chunk) goes to the layer whose modelled loss falls most per
    dense weight added, while a step fits. The modelled loss of a layer only flattens as it gets denser, so
    for layers of equal size this is the optimum over the format's steps.
    """
    groups_per_chunk = chunk_size // GROUP_SIZE
    left = budget * sum(s.weights for s in layers)
    dense = [0] * len(layers)

    def step(i: int) -> tuple[float, float] | None:
        """(loss fall per dense weight, dense weights added) of layer i's next step."""
        d = dense[i]
        if d + 2 >= groups_per_chunk:  # the format keeps at least two 2:4 groups per chunk
            return None
        rho, cost = d / groups_per_chunk, layers[i].weights * 2 / groups_per_chunk
        decay = layers[i].decay
        fall = layers[i].loss_rise * (math.exp(-decay * rho) - math.exp(-decay * (rho + 2 / groups_per_chunk)))
        return fall / cost, cost

    heap = [(-s[0], i, s[1]) for i in range(len(layers)) if (s := step(i)) is not None]
    heapq.heapify(heap)
    while heap:
        _, i, cost = heapq.heappop(heap)
        if cost > left + 1e-6:  # this layer's steps no longer fit; smaller layers' may
            continue
        dense[i] += 2
        left -= cost
        if (s := step(i)) is not None:
            heapq.heappush(heap, (-s[0], i, s[1]))
    return {name: d for s, d in zip(layers, dense) for name in s.linears}


def dense_share(plan: DensePlan, model: nn.Module, chunk_size: int) -> float:
    """Share of the targeted weights that the plan keeps dense."""
    shapes = {name: module.weight.shape for name, module in model.named_modules() if name in plan}
    dense = sum(n * k * plan[name] * GROUP_SIZE / chunk_size for name, (n, k) in shapes.items())
    return dense / sum(n * k for n, k in shapes.values())
