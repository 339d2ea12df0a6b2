"""``SpenseLinearMethod``: Spense weights inside vLLM's Linear layers.

``create_weights`` declares the four tensors (five with FP8 values: ``weight_scale`` [N]) with vLLM's
parameter classes, so vLLM's own loaders shard them: rows (N) split for column-parallel layers, input
channels (K) for row-parallel ones. Because every 128-channel chunk holds the same number of dense
groups (docs/FORMAT.md), a K split on chunk boundaries gives each rank a contiguous slice of
``dense_weight``, ``sparse_weight``, ``sparse_meta`` and ``dense_mask``; ``weight_scale`` follows the rows.
Merged layers (qkv, gate_up) load each part's rows into its offset; their ``dense_mask`` must be
identical, which the mask parameter checks as each part arrives.
"""

from __future__ import annotations

import torch
from vllm.model_executor.layers.linear import LinearMethodBase, register_weight_loader_v2_supported_method
from vllm.model_executor.parameter import ChannelQuantScaleParameter, ModelWeightParameter, RowvLLMParameter

from vllm_spense import linear_kernel
from vllm_spense.format import GROUP_SIZE, SPARSE_KEPT, VALUE_DTYPES, WEIGHT_SCALE, SpenseFormatError, SpenseTensor

_QKV_INDEX = {"q": 0, "k": 1, "v": 2}


def _part(shard_id) -> int:
    """Index of a merged layer's part from vLLM's shard id (q/k/v, an int, or None for unmerged layers)."""
    return 0 if shard_id is None else _QKV_INDEX.get(shard_id, shard_id)


class _CheckedLoads:
    """Loads that name the layer and tensor when a checkpoint tensor does not fit, and record which parts
    of a merged layer arrived."""

    def _spense_init(self, layer: str, tensor: SpenseTensor | str, shard_names: list[str], dtypes: tuple) -> None:
        self.spense_layer, self.shard_names, self.dtypes = layer, shard_names, dtypes
        self.spense_tensor = getattr(tensor, "value", tensor)  # the checkpoint suffix
        self.loaded_shards: set = set()

    def checkpoint_name(self, part: int) -> str:
        return f"{self.shard_names[part]}.{self.spense_tensor}"

    def _load(self, load, loaded_weight: torch.Tensor, shard_id=None, /, **kwargs) -> None:
        part = _part(shard_id)
        where = f"layer {self.spense_layer}, tensor {self.checkpoint_name(part)}"
        if loaded_weight.dtype not in self.dtypes:
            raise SpenseFormatError(f"{where}: expected dtype in {[str(d) for d in self.dtypes]}, "
                                    f"found {loaded_weight.dtype}")
        try:
            load(loaded_weight=loaded_weight, **kwargs)
        except (AssertionError, RuntimeError, IndexError) as error:
            raise SpenseFormatError(
                f"{where}: checkpoint shape {list(loaded_weight.shape)} does not fit this layer's "
                f"{list(self.data.shape)} on tensor-parallel rank {self.tp_rank} of {self.tp_size} ({error})"
            ) from None
        self.loaded_shards.add(part)

    def _check_whole(self, loaded_weight: torch.Tensor) -> None:
        """A tensor every rank holds whole (vLLM's loaders would narrow a larger one silently)."""
        if tuple(loaded_weight.shape) != tuple(self.data.shape):
            raise AssertionError(f"expected {list(self.data.shape)}")

    def load_column_parallel_weight(self, loaded_weight):
        self._load(super().load_column_parallel_weight, loaded_weight)

    def load_row_parallel_weight(self, loaded_weight):
        self._load(self._load_row_parallel, loaded_weight)

    def _load_row_parallel(self, loaded_weight: torch.Tensor) -> None:
        # vLLM narrows the input dimension to this rank's slice, which silently accepts a wider tensor.
        expected = [size * (self.tp_size if dim == self.input_dim else 1) for dim, size in enumerate(self.data.shape)]
        if list(loaded_weight.shape) != expected:
            raise AssertionError(f"expected the whole tensor {expected} over {self.tp_size} ranks")
        super().load_row_parallel_weight(loaded_weight)

    def load_merged_column_weight(self, loaded_weight, **kwargs):
        self._load(super().load_merged_column_weight, loaded_weight, kwargs.get("shard_id"), **kwargs)

    def load_qkv_weight(self, loaded_weight, **kwargs):
        self._load(super().load_qkv_weight, loaded_weight, kwargs.get("shard_id"), **kwargs)


class SpenseWeightParameter(_CheckedLoads, ModelWeightParameter):
    """dense_weight, sparse_weight, sparse_meta: [N, columns], sharded like a Linear weight."""


class SpenseMaskParameter(_CheckedLoads, RowvLLMParameter):
    """dense_mask [K/4]: split with K on row-parallel layers, whole (and shared by all parts) otherwise."""

    def _load_whole(self, loaded_weight: torch.Tensor, **kwargs) -> None:
        self._check_whole(loaded_weight)
        if self.loaded_shards and not torch.equal(self.data, loaded_weight.to(self.data.device)):
            first = self.checkpoint_name(min(self.loaded_shards))
            raise SpenseFormatError(
                f"layer {self.spense_layer}, tensor {self.checkpoint_name(_part(kwargs.get('shard_id')))}: differs from "
                f"{first}; vLLM merges these layers into one, so they must share one dense-group mask (prune "
                f"them with spense-prune, which chooses one mask per layer input)")
        self.data.copy_(loaded_weight)

    def load_column_parallel_weight(self, loaded_weight):
        self._load(self._load_whole, loaded_weight)

    def load_merged_column_weight(self, loaded_weight, **kwargs):
        self._load(self._load_whole, loaded_weight, kwargs.get("shard_id"), **kwargs)

    def load_qkv_weight(self, loaded_weight, **kwargs):
        self._load(self._load_whole, loaded_weight, kwargs.get("shard_id"), **kwargs)


class SpenseScaleParameter(_CheckedLoads, ChannelQuantScaleParameter):
    """weight_scale [N] float32 (FP8 checkpoints): split with the rows it scales, whole on row-parallel layers."""

    def load_row_parallel_weight(self, loaded_weight):
        self._load(self._load_whole, loaded_weight)

    def _load_whole(self, loaded_weight: torch.Tensor) -> None:
        self._check_whole(loaded_weight)
        self.data.copy_(loaded_weight)


@register_weight_loader_v2_supported_method
class SpenseLinearMethod(LinearMethodBase):
    """Linear layers stored in the Spense format; ``apply`` is one call of ``torch.ops.spense.linear``."""

    def __init__(self, quant_config, prefix: str):
        self.quant_config = quant_config
        self.prefix = prefix

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs) -> None:
        spense = self.quant_config.spense
        chunk = spense.chunk_size
        if input_size_per_partition % chunk:
            raise SpenseFormatError(
                f"layer {self.prefix}: this rank holds {input_size_per_partition} of its {input_size} input "
                f"channels, not a multiple of the checkpoint's chunk size {chunk}; use a tensor-parallel size "
                f"that splits K into whole {chunk}-channel chunks (or prune with a smaller --chunk-size)")
        n = sum(output_partition_sizes)
        groups = input_size_per_partition // GROUP_SIZE
        shard_names = self.quant_config.shard_names(self.prefix)
        g_dense = self._dense_groups_per_chunk(shard_names) * (input_size_per_partition // chunk)
        g_sparse = groups - g_dense
        loader = extra_weight_attrs["weight_loader"]
        fp8 = spense.stored_value_dtype  # FP8 checkpoints fix the values' dtype; others store the model's
        value_dtype, values = (fp8, (fp8,)) if fp8 is not None else (params_dtype, VALUE_DTYPES)
        for tensor, columns, dtype, allowed in (
                (SpenseTensor.DENSE_WEIGHT, GROUP_SIZE * g_dense, value_dtype, values),
                (SpenseTensor.SPARSE_WEIGHT, SPARSE_KEPT * g_sparse, value_dtype, values),
                (SpenseTensor.SPARSE_META, g_sparse // 2, torch.uint8, (torch.uint8,))):
            param = SpenseWeightParameter(data=torch.empty(n, columns, dtype=dtype), input_dim=1, output_dim=0,
                                          weight_loader=loader)
            param._spense_init(self.prefix, tensor, shard_names, allowed)
            layer.register_parameter(tensor.value, param)
        mask = SpenseMaskParameter(data=torch.zeros(groups, dtype=torch.bool), input_dim=0, weight_loader=loader)
        mask._spense_init(self.prefix, SpenseTensor.DENSE_MASK, shard_names, (torch.bool,))
        layer.register_parameter(SpenseTensor.DENSE_MASK.value, mask)
        if fp8 is not None:
            scale = SpenseScaleParameter(data=torch.empty(n, dtype=torch.float32), output_dim=0, weight_loader=loader)
            scale._spense_init(self.prefix, WEIGHT_SCALE, shard_names, (torch.float32,))
            layer.register_parameter(WEIGHT_SCALE, scale)
        layer.spense_parts = list(zip(shard_names, output_partition_sizes, strict=True))

    def _dense_groups_per_chunk(self, shard_names: list[str]) -> int:
        """This layer's dense groups per chunk (per-layer with an adaptive allocation); the parts of a merged
        layer share one mask, so they must agree."""
        spense = self.quant_config.spense
        counts = {name: spense.layer_dense_groups_per_chunk(name) for name in shard_names}
        if len(set(counts.values())) > 1:
            fractions = {name: spense.layer_dense_fraction(name) for name in shard_names}
            raise SpenseFormatError(
                f"layer {self.prefix}: vLLM merges {shard_names} into one layer with one dense mask, but "
                f"quantization_config gives them different dense fractions {fractions}")
        return counts[shard_names[0]]

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        for name in (*(tensor.value for tensor in SpenseTensor), WEIGHT_SCALE):
            param = getattr(layer, name, None)
            if param is None:  # no weight_scale: not an FP8 checkpoint
                continue
            missing = [param.checkpoint_name(part) for part in range(len(layer.spense_parts))
                       if part not in param.loaded_shards]
            if missing:
                raise SpenseFormatError(f"layer {self.prefix}: tensors {missing} missing from the checkpoint")
        linear_kernel.process_weights_after_loading(layer, layer.spense_parts, self.quant_config.spense.chunk_size,
                                                    self.quant_config.spense.stored_value_dtype,
                                                    layer.params_dtype)  # vLLM's LinearBase: the model's dtype

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return linear_kernel.apply(layer, x, bias)
