"""The layer-sequential driver: one decoder layer on the device at a time, as SparseGPT runs it.

For each decoder layer: run the calibration activations through it once with hooks that accumulate
the Hessian ``X^T X / n`` of every distinct Linear input (q/k/v share one, gate/up share one), choose
the dense groups of each input, prune every Linear of the layer, then run the *pruned* layer to get
the next layer's inputs. Finished layers go to a ``LayerStore`` (the checkpoint writer) so a crash
resumes at the last finished layer.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from vllm_spense.format import (DEFAULT_CHUNK_SIZE, GROUP_SIZE, SpenseFormatError, dense_groups_per_chunk,
                                fp8_round, fp8_scales, pack)
from vllm_spense.offline.allocation import ALLOCATIONS, DensePlan, uniform_plan
from vllm_spense.offline.models import decoder_layers, target_linears
from vllm_spense.offline.selection import (SELECTIONS, activation_score, balanced_top_groups,
                                           random_score)
from vllm_spense.offline.sparsegpt import ORDERS, magnitude_2_4, sparsify_weight, wanda_2_4

logger = logging.getLogger(__name__)

METHODS = ("spensegpt", "sparsegpt", "wanda", "magnitude")
UNSTRUCTURED = "sparsegpt-unstructured"  # upper reference for the quality table; writes no Spense checkpoint
WEIGHT_DTYPES = ("fp8",)  # --weight-dtype: FP8 (e4m3) values with per-output-channel scales
# How FP8 rounding meets pruning: "obs" rounds inside the OBS sweep and compensates the rounding error (scales
# from the unpruned rows); "after" rounds the finished pruned weight (scales from its rows).
FP8_COMPENSATIONS = ("obs", "after")


class PruneError(ValueError):
    """A pruning request that cannot be carried out; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class PruneRecipe:
    method: str = "spensegpt"
    dense_fraction: float = 0.25  # the budget: share of targeted weights kept dense
    allocation: str = "uniform"
    selection: str = "error"
    order: str = "dense-last"
    chunk_size: int | None = None  # None: the largest of 128, 64, ... that fits every layer
    blocksize: int = 128
    damp: float = 0.01
    seed: int = 0
    sparsity: float | None = None  # only for UNSTRUCTURED
    weight_dtype: str | None = None  # None: the checkpoint's float dtype; "fp8"
    fp8_compensation: str = "obs"

    def __post_init__(self) -> None:
        if self.method not in METHODS + (UNSTRUCTURED,):
            raise PruneError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not 0.0 <= self.dense_fraction < 1.0:
            raise PruneError(f"--dense-fraction must be in [0, 1), found {self.dense_fraction}")
        if self.method != "spensegpt" and self.dense_fraction:
            raise PruneError(f"--method {self.method} is a plain 2:4 baseline: use --dense-fraction 0, or "
                             f"--method spensegpt for a dense region")
        if self.allocation not in ALLOCATIONS:
            raise PruneError(f"unknown allocation {self.allocation!r}; choose one of {', '.join(ALLOCATIONS)}")
        if self.allocation == "adaptive" and self.method != "spensegpt":
            raise PruneError(f"--allocation adaptive spends a dense budget; --method {self.method} has none")
        if self.selection not in SELECTIONS:
            raise PruneError(f"unknown selection {self.selection!r}; choose one of {', '.join(SELECTIONS)}")
        if self.order not in ORDERS:
            raise PruneError(f"unknown order {self.order!r}; choose one of {', '.join(ORDERS)}")
        if self.weight_dtype is not None and self.weight_dtype not in WEIGHT_DTYPES:
            raise PruneError(f"unknown weight dtype {self.weight_dtype!r}; choose one of {', '.join(WEIGHT_DTYPES)}")
        if self.fp8_compensation not in FP8_COMPENSATIONS:
            raise PruneError(f"unknown FP8 compensation {self.fp8_compensation!r}; choose one of "
                             f"{', '.join(FP8_COMPENSATIONS)}")
        if (self.method == UNSTRUCTURED) != (self.sparsity is not None):
            raise PruneError("sparsity is given for the unstructured reference and only for it")

    @property
    def writes_spense(self) -> bool:
        return self.method != UNSTRUCTURED


class LayerStore(Protocol):
    """Where finished layers go; the checkpoint writer implements it."""

    def resume_point(self) -> tuple[int, torch.Tensor | None]: ...
    def load_layer(self, index: int) -> dict[str, torch.Tensor]: ...
    def save_layer(self, index: int, tensors: dict[str, torch.Tensor], next_inputs: torch.Tensor) -> None: ...


def resolve_chunk_size(model: nn.Module, recipe: PruneRecipe, widths_only: bool = False) -> int:
    """The chunk size to use: the recipe's, or the largest power of two <= 128 that fits every layer.

    A uniform recipe's dense fraction must also come out as an even number of groups per chunk, unless
    ``widths_only`` (the fraction is not known yet, as when ``--target-bytes`` chooses it)."""
    check_fraction = recipe.allocation == "uniform" and not widths_only
    widths = {linear.in_features for layer in decoder_layers(model) for linear in target_linears(layer).values()}
    if not widths:
        raise PruneError(f"{type(model).__name__} has no Linear layers inside its decoder layers to prune")
    candidates = [recipe.chunk_size] if recipe.chunk_size else [DEFAULT_CHUNK_SIZE >> i for i in range(5)]
    for chunk in candidates:
        bad = sorted(w for w in widths if w % chunk)
        if bad:
            continue
        if check_fraction:
            try:
                dense_groups_per_chunk(recipe.dense_fraction, chunk)
            except SpenseFormatError:
                continue
        return chunk
    if recipe.chunk_size:
        bad = sorted(w for w in widths if w % recipe.chunk_size)
        if bad:
            raise PruneError(f"input widths {bad} are not multiples of --chunk-size {recipe.chunk_size}")
        if check_fraction:
            dense_groups_per_chunk(recipe.dense_fraction, recipe.chunk_size)  # raises with the allowed step
    raise PruneError(f"no chunk size in {candidates} divides every input width {sorted(widths)} and holds an "
                     f"even number of dense groups at --dense-fraction {recipe.dense_fraction}")


class _StopForward(Exception):
    pass


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, calibration: torch.Tensor, device: torch.device
                         ) -> tuple[torch.Tensor, dict]:
    """Hidden states entering the first decoder layer [n, seqlen, hidden] and its keyword arguments."""
    first = decoder_layers(model)[0]
    captured: dict = {}

    def hook(module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]
        captured.setdefault("kwargs", {k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _StopForward

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    hidden = []
    try:
        for sample in calibration:
            try:
                model(sample[None].to(model.device), use_cache=False)
            except _StopForward:
                pass
            hidden.append(captured["hidden"][0].to(device))
    finally:
        handle.remove()
    kwargs = {key: _to_device(value, device) for key, value in captured["kwargs"].items()}
    kwargs.update(past_key_values=None, use_cache=False)
    return torch.stack(hidden), kwargs


def _to_device(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to_device(v, device) for v in value)
    return value


@torch.no_grad()
def _run_layer(layer: nn.Module, inputs: torch.Tensor, kwargs: dict, batch_size: int) -> torch.Tensor:
    outputs = torch.empty_like(inputs)
    for start in range(0, inputs.shape[0], batch_size):
        out = layer(inputs[start:start + batch_size], **kwargs)
        outputs[start:start + batch_size] = out[0] if isinstance(out, tuple) else out
    return outputs


@torch.no_grad()
def collect_hessians(layer: nn.Module, inputs: torch.Tensor, kwargs: dict, batch_size: int
                     ) -> dict[tuple[str, ...], torch.Tensor]:
    """Hessian ``X^T X / n`` per distinct input, keyed by the names of the Linears that read it."""
    linears = target_linears(layer)
    # Linears that receive the very same input tensor object share it. The tensors are kept alive during
    # the pass so that a freed input's memory cannot be reused for a later one.
    seen: list[tuple[torch.Tensor, list[str]]] = []

    def record(name):
        def hook(module, args, output):
            for tensor, names in seen:
                if tensor is args[0]:
                    names.append(name)
                    return
            seen.append((args[0], [name]))
        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in linears.items()]
    try:
        layer(inputs[:1], **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    groups = [tuple(names) for _, names in seen]
    seen.clear()  # release the recorded inputs
    hessians = {g: torch.zeros(linears[g[0]].in_features, linears[g[0]].in_features, device=inputs.device)
                for g in groups}
    counts = dict.fromkeys(groups, 0)

    def accumulate(group):
        def hook(module, args, output):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            hessians[group].addmm_(x.t(), x)
            counts[group] += x.shape[0]
        return hook

    handles = [linears[g[0]].register_forward_hook(accumulate(g)) for g in groups]
    try:
        _run_layer(layer, inputs, kwargs, batch_size)
    finally:
        for handle in handles:
            handle.remove()
    return {g: h / max(counts[g], 1) for g, h in hessians.items()}


def choose_dense_mask(recipe: PruneRecipe, weights: list[torch.Tensor], hessian: torch.Tensor,
                      chunk_size: int, dense_per_chunk: int, generator: torch.Generator, layer: str) -> torch.Tensor:
    """One balanced dense mask for every matrix reading the same input."""
    num_groups = hessian.shape[0] // GROUP_SIZE
    if dense_per_chunk == 0:
        return torch.zeros(num_groups, dtype=torch.bool, device=hessian.device)
    if recipe.selection == "activation":
        score = activation_score(torch.diag(hessian))
    elif recipe.selection == "error":
        score = sum(sparsify_weight(w, hessian, order="natural", blocksize=recipe.blocksize, damp=recipe.damp,
                                    layer=layer).group_loss for w in weights)
    else:
        score = random_score(num_groups, generator).to(hessian.device)
    return balanced_top_groups(score, chunk_size, dense_per_chunk)


def prune_weight(recipe: PruneRecipe, weight: torch.Tensor, hessian: torch.Tensor, dense_mask: torch.Tensor,
                 layer: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The pruned weight and, for FP8, its per-output-channel scales (the weight then holds float32 values
    on the FP8 grid of those scales)."""
    in_sweep = recipe.weight_dtype == "fp8" and recipe.fp8_compensation == "obs" and recipe.method in (
        "spensegpt", "sparsegpt", UNSTRUCTURED)
    scale = fp8_scales(weight) if in_sweep else None
    if recipe.method == "wanda":
        pruned = wanda_2_4(weight, torch.diag(hessian))
    elif recipe.method == "magnitude":
        pruned = magnitude_2_4(weight)
    else:
        quantize = (lambda column: fp8_round(column[:, None], scale)[:, 0]) if in_sweep else None
        pruned = sparsify_weight(weight, hessian, dense_mask=dense_mask, sparsity=recipe.sparsity,
                                 order=recipe.order, blocksize=recipe.blocksize, damp=recipe.damp, layer=layer,
                                 quantize=quantize).weight
    if recipe.weight_dtype is None:
        return pruned, None
    if scale is None:
        scale = fp8_scales(pruned)
    # Also after the sweep's rounding: sparsify_weight returns the input's dtype, which may be bf16.
    return fp8_round(pruned, scale), scale


@torch.no_grad()
def prune_model(model: nn.Module, calibration: torch.Tensor, recipe: PruneRecipe, *,
                device: str | torch.device = "cpu", save_dtype: torch.dtype = torch.float32,
                batch_size: int = 8, store: LayerStore | None = None, plan: DensePlan | None = None,
                on_layer: Callable[[int, dict], None] | None = None) -> int:
    """Prune ``model`` in place, layer by layer; return the chunk size used.

    ``plan`` gives each Linear's dense groups per chunk (``offline.allocation``); by default every
    matrix gets the recipe's dense fraction. Weights are rounded to ``save_dtype`` as they are pruned,
    so later layers calibrate on exactly the weights the checkpoint will hold.
    """
    device = torch.device(device)
    chunk_size = resolve_chunk_size(model, recipe)
    if plan is None:
        plan = uniform_plan(model, recipe.dense_fraction, chunk_size)
    layers = decoder_layers(model)
    names = {module: name for name, module in model.named_modules()}
    inputs, kwargs = capture_layer_inputs(model, calibration, device)
    start = 0
    if store is not None:
        start, saved_inputs = store.resume_point()
        for index in range(start):
            _load_packed_layer(layers[index], names[layers[index]], store.load_layer(index))
        if saved_inputs is not None:
            inputs = saved_inputs.to(device)
        if start:
            logger.info("resuming after %d finished layers", start)
    progress = tqdm(range(start, len(layers)), desc="pruning", unit="layer", initial=start, total=len(layers))
    for index in progress:
        layer = layers[index]
        prefix = names[layer]
        layer.to(device)
        hessians = collect_hessians(layer, inputs, kwargs, batch_size)
        linears = target_linears(layer)
        generator = torch.Generator().manual_seed(recipe.seed * 100_003 + index)
        tensors: dict[str, torch.Tensor] = {}
        stats = {}
        for group, hessian in hessians.items():
            full = f"{prefix}.{group[0]}"
            mask = choose_dense_mask(recipe, [linears[n].weight for n in group], hessian, chunk_size, plan[full],
                                     generator, full)
            for name in group:
                linear = linears[name]
                pruned, scale = prune_weight(recipe, linear.weight, hessian, mask, f"{prefix}.{name}")
                pruned = pruned.to(save_dtype) if scale is None else pruned.float()  # FP8: on its grid already
                stats[name] = _relative_output_error(linear.weight.float(), pruned.float(), hessian)
                linear.weight.copy_(pruned.to(linear.weight.dtype))
                if recipe.writes_spense:
                    tensors.update(pack(pruned, mask, chunk_size, f"{prefix}.{name}", weight_scale=scale
                                        ).tensors(f"{prefix}.{name}"))
        for key, value in layer.state_dict().items():
            full = f"{prefix}.{key}"
            is_packed_weight = recipe.writes_spense and key.endswith(".weight") and key[:-7] in linears
            if not is_packed_weight:
                tensors[full] = value.to(save_dtype) if value.is_floating_point() else value
        inputs = _run_layer(layer, inputs, kwargs, batch_size)
        layer.to("cpu")
        if store is not None:
            store.save_layer(index, {k: v.cpu().contiguous() for k, v in tensors.items()}, inputs)
        progress.set_postfix(rel_err=f"{max(stats.values()):.3g}")
        if on_layer is not None:
            on_layer(index, stats)
    return chunk_size


def _relative_output_error(weight: torch.Tensor, pruned: torch.Tensor, hessian: torch.Tensor) -> float:
    """||X (W - W')^T||^2 / ||X W^T||^2 through the Hessian, without X."""
    error = pruned - weight
    return float(((error @ hessian) * error).sum() / ((weight @ hessian) * weight).sum())


def _load_packed_layer(layer: nn.Module, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
    """Put a finished layer's stored weights back into the model (when resuming)."""
    from vllm_spense.format import PackedSpenseWeight, unpack

    for name, linear in target_linears(layer).items():
        packed = PackedSpenseWeight.from_tensors(f"{prefix}.{name}", tensors)
        linear.weight.data.copy_(unpack(packed).to(linear.weight.dtype))
    state = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    own = layer.state_dict()
    layer.load_state_dict({k: state.get(k, own[k]).to(own[k].dtype) for k in own}, strict=True)
