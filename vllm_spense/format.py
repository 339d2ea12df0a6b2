"""The Spense weight format: the one source of truth for the pruner, the plugin and the kernels.

A Linear weight ``W [N, K]`` is cut along its input channels into groups of ``GROUP_SIZE = 4``
consecutive channels. Every group is either *dense* (all 4 values kept in every row) or *2:4*
(two values kept per row). Which groups are dense is one boolean per group, the same for every
row, and every chunk of ``chunk_size`` consecutive input channels holds the same number of dense
groups, so any tensor-parallel split of K into whole chunks gives each rank the same shapes.

Tensors of one layer, stored under the layer's Hugging Face name (``<layer>.<suffix>``)::

    dense_weight  [N, 4 * G_dense]   float16/bfloat16/float32  dense groups, ascending channel order
    sparse_weight [N, 2 * G_sparse]  same dtype as dense_weight the two kept values of each 2:4
                                                               group, ascending group then position
    sparse_meta   [N, G_sparse / 2]  uint8                     4 bits per 2:4 group: bits 0-1 = index of
                                                               the first kept value, bits 2-3 = index of
                                                               the second (first < second); group 2j in
                                                               the low nibble, group 2j+1 in the high one
    dense_mask    [K / 4]            bool                      True where the group is dense
    weight_scale  [N]                float32                   only with ``weight_dtype`` float8_e4m3fn:
                                                               per-output-channel scale of both regions

``G_dense + G_sparse = K / 4``. The dense-group count per chunk is even, so every chunk (and so every
tensor-parallel shard) holds an even number of 2:4 groups and whole metadata bytes.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from typing import Iterable, Mapping, NamedTuple, Sequence

import torch

FORMAT_VERSION = 1
QUANT_METHOD = "spense"
GROUP_SIZE = 4
SPARSE_KEPT = 2  # values kept per 2:4 group
DEFAULT_CHUNK_SIZE = 128
VALUE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# quantization_config.weight_dtype -> stored value dtype: FP8 values times a per-output-channel weight_scale.
WEIGHT_DTYPES = {"float8_e4m3fn": torch.float8_e4m3fn}
FP8_MAX = 448.0  # largest finite float8_e4m3fn
# lm_head and the embeddings are never pruned (they are not in decoder layers, and never targeted).
DEFAULT_IGNORE = ("lm_head", "re:.*embed_tokens$")


class SpenseFormatError(ValueError):
    """A checkpoint or tensor that does not follow the Spense format; the message names where."""


class SpenseTensor(str, enum.Enum):
    """Suffixes of the tensors one Spense layer stores, after ``<layer name>.``."""

    DENSE_WEIGHT = "dense_weight"
    SPARSE_WEIGHT = "sparse_weight"
    SPARSE_META = "sparse_meta"
    DENSE_MASK = "dense_mask"

    def key(self, layer: str) -> str:
        return f"{layer}.{self.value}"


LAYER_TENSORS = tuple(SpenseTensor)
WEIGHT_SCALE = "weight_scale"  # FP8 checkpoints only
OPTIONAL_LAYER_TENSORS = ("bias", WEIGHT_SCALE)


class PackedSpenseWeight(NamedTuple):
    dense_weight: torch.Tensor
    sparse_weight: torch.Tensor
    sparse_meta: torch.Tensor
    dense_mask: torch.Tensor
    weight_scale: torch.Tensor | None = None  # [N] float32 when the values are FP8

    @property
    def shape(self) -> tuple[int, int]:
        return self.dense_weight.shape[0], self.dense_mask.numel() * GROUP_SIZE

    def tensors(self, layer: str) -> dict[str, torch.Tensor]:
        tensors = {t.key(layer): getattr(self, t.value) for t in LAYER_TENSORS}
        if self.weight_scale is not None:
            tensors[f"{layer}.{WEIGHT_SCALE}"] = self.weight_scale
        return tensors

    @classmethod
    def from_tensors(cls, layer: str, tensors: Mapping[str, torch.Tensor]) -> "PackedSpenseWeight":
        missing = [t.key(layer) for t in LAYER_TENSORS if t.key(layer) not in tensors]
        if missing:
            raise SpenseFormatError(f"layer {layer}: missing tensors {missing}")
        return cls(*(tensors[t.key(layer)] for t in LAYER_TENSORS), tensors.get(f"{layer}.{WEIGHT_SCALE}"))


@dataclasses.dataclass(frozen=True)
class SpenseQuantConfig:
    """The ``quantization_config`` block of a Spense checkpoint's config.json."""

    dense_fraction: float
    chunk_size: int = DEFAULT_CHUNK_SIZE
    group_size: int = GROUP_SIZE
    format_version: int = FORMAT_VERSION
    targets: tuple[str, ...] = ("Linear",)
    ignore: tuple[str, ...] = DEFAULT_IGNORE
    # How the checkpoint was made (method, selection, samples...): informative only.
    pruning: Mapping[str, object] = dataclasses.field(default_factory=dict)
    # Per-layer fractions by checkpoint layer name (an adaptive allocation lists every layer); a layer not
    # listed has ``dense_fraction``. vLLM sizes each layer's tensors from this before any tensor is read.
    dense_fractions: Mapping[str, float] = dataclasses.field(default_factory=dict)
    # None: values in the checkpoint's own float dtype; "float8_e4m3fn": FP8 values and a weight_scale.
    weight_dtype: str | None = None

    def __post_init__(self) -> None:
        where = "quantization_config"
        if self.format_version != FORMAT_VERSION:
            raise SpenseFormatError(
                f"{where}: unknown format_version {self.format_version!r}; this version of vllm-spense "
                f"reads format_version {FORMAT_VERSION}")
        if self.group_size != GROUP_SIZE:
            raise SpenseFormatError(f"{where}: group_size must be {GROUP_SIZE}, found {self.group_size!r}")
        if not isinstance(self.chunk_size, int) or self.chunk_size <= 0 or self.chunk_size % (2 * GROUP_SIZE):
            raise SpenseFormatError(
                f"{where}: chunk_size must be a positive multiple of {2 * GROUP_SIZE}, found {self.chunk_size!r}")
        if not (0.0 <= float(self.dense_fraction) < 1.0):
            raise SpenseFormatError(f"{where}: dense_fraction must be in [0, 1), found {self.dense_fraction!r}")
        if self.weight_dtype is not None and self.weight_dtype not in WEIGHT_DTYPES:
            raise SpenseFormatError(f"{where}: weight_dtype must be one of {sorted(WEIGHT_DTYPES)} (or absent), "
                                    f"found {self.weight_dtype!r}")
        for layer, fraction in self.dense_fractions.items():
            if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0.0 <= fraction < 1.0:
                raise SpenseFormatError(f"{where}: dense_fractions[{layer!r}] must be a number in [0, 1), "
                                        f"found {fraction!r}")
            try:
                dense_groups_per_chunk(fraction, self.chunk_size)
            except SpenseFormatError as error:
                raise SpenseFormatError(f"{where}: dense_fractions[{layer!r}]: {error}") from None

    def layer_dense_fraction(self, layer: str) -> float:
        """The dense fraction of one checkpoint layer (``model.layers.0.self_attn.q_proj``)."""
        return self.dense_fractions.get(layer, self.dense_fraction)

    def layer_dense_groups_per_chunk(self, layer: str) -> int:
        try:
            return dense_groups_per_chunk(self.layer_dense_fraction(layer), self.chunk_size)
        except SpenseFormatError as error:
            raise SpenseFormatError(f"layer {layer}: quantization_config gives it no dense_fractions entry, and "
                                    f"the model-wide {error}") from None

    @property
    def groups_per_chunk(self) -> int:
        return self.chunk_size // GROUP_SIZE

    def to_dict(self) -> dict:
        return {
            "quant_method": QUANT_METHOD,
            "format_version": self.format_version,
            "group_size": self.group_size,
            "chunk_size": self.chunk_size,
            "dense_fraction": self.dense_fraction,
            "targets": list(self.targets),
            "ignore": list(self.ignore),
            "pruning": dict(self.pruning),
            **({"dense_fractions": dict(self.dense_fractions)} if self.dense_fractions else {}),
            **({"weight_dtype": self.weight_dtype} if self.weight_dtype else {}),
        }

    @property
    def stored_value_dtype(self) -> torch.dtype | None:
        """The dtype every layer's values must have when the config fixes it (FP8), else None."""
        return WEIGHT_DTYPES[self.weight_dtype] if self.weight_dtype else None

    @classmethod
    def from_dict(cls, config: Mapping) -> "SpenseQuantConfig":
        if config.get("quant_method") != QUANT_METHOD:
            raise SpenseFormatError(
                f"quantization_config: quant_method must be {QUANT_METHOD!r}, found {config.get('quant_method')!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - known - {"quant_method"})
        if unknown:
            raise SpenseFormatError(f"quantization_config: unknown keys {unknown}")
        if "dense_fraction" not in config:
            raise SpenseFormatError("quantization_config: missing key 'dense_fraction'")
        kwargs = dict(config)
        kwargs.pop("quant_method")
        for key in ("targets", "ignore"):
            if key in kwargs:
                value = kwargs[key]
                if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
                    raise SpenseFormatError(f"quantization_config: {key} must be a list of strings, found {value!r}")
                kwargs[key] = tuple(value)
        for key in ("format_version", "group_size", "chunk_size"):
            if key in kwargs and (not isinstance(kwargs[key], int) or isinstance(kwargs[key], bool)):
                raise SpenseFormatError(f"quantization_config: {key} must be an integer, found {kwargs[key]!r}")
        fraction = kwargs["dense_fraction"]
        if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or fraction != fraction:
            raise SpenseFormatError(f"quantization_config: dense_fraction must be a number, found {fraction!r}")
        for key in ("pruning", "dense_fractions"):
            if not isinstance(kwargs.get(key, {}), dict):
                raise SpenseFormatError(f"quantization_config: {key} must be an object, found {kwargs[key]!r}")
        return cls(**kwargs)

    def is_ignored(self, module_name: str) -> bool:
        return any(_name_matches(pattern, module_name) for pattern in self.ignore)


def _name_matches(pattern: str, name: str) -> bool:
    """compressed-tensors style: ``re:<regex>`` matches by regex, anything else by exact name or suffix."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def dense_groups_per_chunk(dense_fraction: float, chunk_size: int) -> int:
    """Dense groups in each chunk for a dense fraction; it must come out whole and even."""
    groups = dense_fraction * chunk_size / GROUP_SIZE
    count = round(groups)
    if abs(groups - count) > 1e-9 or count % 2:
        step = 2 * GROUP_SIZE / chunk_size
        raise SpenseFormatError(
            f"dense fraction {dense_fraction} with chunk size {chunk_size} gives {groups:g} dense groups per "
            f"chunk; it must be an even whole number, so use a multiple of {step:g}")
    return count


def stored_bytes_ratio(dense_fraction: float, value_bytes: int) -> float:
    """Bytes a Spense matrix stores, which a decode GEMM reads, per byte of the dense matrix.

    A dense group keeps its 4 values; a 2:4 group keeps 2 values and one 4-bit index pair (half a byte).
    The mask (one byte per group, once per matrix) is left out: under 0.1% of any real layer.
    """
    sparse = (SPARSE_KEPT * value_bytes + 0.5) / (GROUP_SIZE * value_bytes)
    return dense_fraction + (1.0 - dense_fraction) * sparse


def dense_fraction_for_bytes(ratio: float, value_bytes: int) -> float:
    """The dense fraction whose Spense matrices store ``ratio`` times the dense bytes (inverse of the above)."""
    floor = stored_bytes_ratio(0.0, value_bytes)
    return (ratio - floor) / (1.0 - floor)


def _fail(layer: str, tensor: SpenseTensor, message: str) -> None:
    raise SpenseFormatError(f"layer {layer}, tensor {tensor.key(layer)}: {message}")


def _check_mask_layout(shape: Sequence[int], dtype: torch.dtype, chunk_size: int, layer: str) -> int:
    """A mask's dtype and shape: 1-D bool covering whole chunks. Returns its number of groups."""
    if dtype != torch.bool or len(shape) != 1:
        _fail(layer, SpenseTensor.DENSE_MASK, f"expected a 1-D bool tensor, found {dtype} of shape {list(shape)}")
    if shape[0] == 0 or shape[0] % (chunk_size // GROUP_SIZE):
        _fail(layer, SpenseTensor.DENSE_MASK, f"{shape[0]} groups ({shape[0] * GROUP_SIZE} input channels) is not "
                                              f"a whole number of {chunk_size}-channel chunks")
    return shape[0]


def check_dense_mask(dense_mask: torch.Tensor, chunk_size: int, layer: str) -> int:
    """Check a mask's dtype and per-chunk balance; return the dense groups per chunk."""
    where = f"layer {layer}, tensor {SpenseTensor.DENSE_MASK.key(layer)}"
    _check_mask_layout(tuple(dense_mask.shape), dense_mask.dtype, chunk_size, layer)
    groups_per_chunk = chunk_size // GROUP_SIZE
    per_chunk = dense_mask.view(-1, groups_per_chunk).sum(dim=1)
    if (per_chunk != per_chunk[0]).any():
        raise SpenseFormatError(
            f"{where}: unbalanced mask; every {chunk_size}-channel chunk must hold the same number of dense "
            f"groups, found counts {sorted(set(per_chunk.tolist()))}")
    count = int(per_chunk[0])
    if count % 2 or count == groups_per_chunk:
        raise SpenseFormatError(
            f"{where}: {count} dense groups per chunk; expected an even number below {groups_per_chunk}")
    return count


def fp8_scales(weight: torch.Tensor) -> torch.Tensor:
    """Per-output-channel FP8 scales [N] float32: each row's largest magnitude lands on FP8_MAX."""
    return (weight.detach().abs().amax(dim=1).float() / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)


def fp8_values(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``weight / scale`` per row, rounded to float8_e4m3fn (saturating at FP8_MAX): what FP8 checkpoints store."""
    return (weight.float() / scale.float()[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def fp8_round(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``weight`` rounded to the FP8 grid of its rows' scales (saturating), as float32; zeros stay zero."""
    return fp8_values(weight, scale).float() * scale.float()[:, None]


def pack(weight: torch.Tensor, dense_mask: torch.Tensor, chunk_size: int, layer: str = "<weight>",
         weight_scale: torch.Tensor | None = None) -> PackedSpenseWeight:
    """Split a pruned dense weight into the Spense tensors; 2:4 groups may hold at most 2 nonzeros.

    With ``weight_scale`` the values are stored as FP8 ``weight / scale`` (exact for a weight already on
    that grid, ``fp8_round``; rounded otherwise)."""
    n, k = weight.shape
    if dense_mask.numel() * GROUP_SIZE != k:
        raise SpenseFormatError(
            f"layer {layer}: dense mask covers {dense_mask.numel() * GROUP_SIZE} input channels, weight has {k}")
    check_dense_mask(dense_mask, chunk_size, layer)
    groups = weight.reshape(n, k // GROUP_SIZE, GROUP_SIZE)
    dense = groups[:, dense_mask, :].reshape(n, -1)
    sparse = groups[:, ~dense_mask, :]
    nonzero = sparse != 0
    too_dense = nonzero.sum(-1) > SPARSE_KEPT
    if too_dense.any():
        raise SpenseFormatError(
            f"layer {layer}: {int(too_dense.sum())} 2:4 groups hold more than {SPARSE_KEPT} nonzero values")
    # Keep the nonzeros; fill up with the lowest zero positions so that every group stores two indices.
    position = torch.arange(GROUP_SIZE, device=weight.device)
    order_key = (~nonzero).to(torch.int64) * GROUP_SIZE + position
    kept = order_key.argsort(dim=-1)[..., :SPARSE_KEPT].sort(dim=-1).values  # [N, Gs, 2], ascending
    values = sparse.gather(-1, kept).reshape(n, -1)
    nibble = (kept[..., 0] | (kept[..., 1] << 2)).to(torch.uint8)
    meta = nibble[:, 0::2] | (nibble[:, 1::2] << 4)
    if weight_scale is None:
        return PackedSpenseWeight(dense.contiguous(), values.contiguous(), meta.contiguous(), dense_mask.clone())
    scale = weight_scale.float().reshape(n).clone()
    return PackedSpenseWeight(fp8_values(dense, scale).contiguous(), fp8_values(values, scale).contiguous(),
                              meta.contiguous(), dense_mask.clone(), scale)


def sparse_indices(sparse_meta: torch.Tensor) -> torch.Tensor:
    """Unpack metadata [N, Gs/2] uint8 into kept positions [N, Gs, 2] (int64, each in 0..3)."""
    nibble = torch.stack((sparse_meta & 0xF, sparse_meta >> 4), dim=-1).reshape(sparse_meta.shape[0], -1)
    return torch.stack((nibble & 0x3, nibble >> 2), dim=-1).to(torch.int64)


def sparse_region(sparse_weight: torch.Tensor, sparse_meta: torch.Tensor) -> torch.Tensor:
    """The 2:4 groups [N, Gs, 4] from their kept values [N, 2 * Gs] and metadata, zeros at pruned positions."""
    kept = sparse_indices(sparse_meta)
    region = torch.zeros(*kept.shape[:2], GROUP_SIZE, dtype=sparse_weight.dtype, device=sparse_weight.device)
    return region.scatter_(-1, kept, sparse_weight.reshape(*kept.shape))


def unpack(packed: PackedSpenseWeight) -> torch.Tensor:
    """Rebuild the dense [N, K] weight (zeros where pruned); exact inverse of ``pack``. FP8 values come
    back dequantized, in float32."""
    n, k = packed.shape
    dense, values = packed.dense_weight, packed.sparse_weight
    if packed.weight_scale is not None:
        dense = dense.float() * packed.weight_scale.float()[:, None]
        values = values.float() * packed.weight_scale.float()[:, None]
    groups = torch.zeros(n, k // GROUP_SIZE, GROUP_SIZE, dtype=dense.dtype, device=dense.device)
    groups[:, packed.dense_mask, :] = dense.reshape(n, -1, GROUP_SIZE)
    groups[:, ~packed.dense_mask, :] = sparse_region(values, packed.sparse_meta)
    return groups.reshape(n, k)


def check_layout(layouts: Mapping[SpenseTensor | str, tuple[Sequence[int], torch.dtype]], chunk_size: int,
                 layer: str, expected_shape: tuple[int, int] | None = None,
                 value_dtype: torch.dtype | None = None) -> int:
    """Shapes and dtypes of one layer's tensors (all a safetensors header holds); returns the dense groups
    per chunk that ``dense_weight``'s width implies. ``value_dtype`` (FP8 checkpoints) fixes the values'
    dtype and requires a ``weight_scale`` layout under the key ``WEIGHT_SCALE``; without it none may exist."""
    num_groups = _check_mask_layout(*layouts[SpenseTensor.DENSE_MASK], chunk_size, layer)
    groups_per_chunk = chunk_size // GROUP_SIZE
    k = num_groups * GROUP_SIZE
    n_chunks = k // chunk_size
    if expected_shape is not None and k != expected_shape[1]:
        _fail(layer, SpenseTensor.DENSE_MASK,
              f"expected {expected_shape[1] // GROUP_SIZE} groups (K={expected_shape[1]}), found {num_groups} (K={k})")
    dense_shape, dtype = layouts[SpenseTensor.DENSE_WEIGHT]
    allowed = (value_dtype,) if value_dtype is not None else VALUE_DTYPES
    if dtype not in allowed:
        why = " (quantization_config.weight_dtype)" if value_dtype is not None else ""
        _fail(layer, SpenseTensor.DENSE_WEIGHT, f"expected dtype in {[str(d) for d in allowed]}{why}, found {dtype}")
    if len(dense_shape) != 2:
        _fail(layer, SpenseTensor.DENSE_WEIGHT, f"expected 2 dimensions, found shape {list(dense_shape)}")
    n = expected_shape[0] if expected_shape is not None else dense_shape[0]
    dense_per_chunk = dense_shape[1] // (GROUP_SIZE * n_chunks)
    if dense_per_chunk * GROUP_SIZE * n_chunks != dense_shape[1] or dense_per_chunk % 2 or \
            dense_per_chunk >= groups_per_chunk:
        _fail(layer, SpenseTensor.DENSE_WEIGHT,
              f"expected shape [{n}, {GROUP_SIZE} x {n_chunks} chunks x an even number of dense groups per "
              f"chunk below {groups_per_chunk}], found {list(dense_shape)}")
    g_sparse = num_groups - dense_per_chunk * n_chunks
    expected = {
        SpenseTensor.DENSE_WEIGHT: ([n, GROUP_SIZE * dense_per_chunk * n_chunks], dtype),
        SpenseTensor.SPARSE_WEIGHT: ([n, SPARSE_KEPT * g_sparse], dtype),
        SpenseTensor.SPARSE_META: ([n, g_sparse // 2], torch.uint8),
    }
    for tensor, (shape, want_dtype) in expected.items():
        found_shape, found_dtype = layouts[tensor]
        if found_dtype != want_dtype:
            same = " (as dense_weight)" if tensor == SpenseTensor.SPARSE_WEIGHT else ""
            _fail(layer, tensor, f"expected dtype {want_dtype}{same}, found {found_dtype}")
        if list(found_shape) != shape:
            _fail(layer, tensor, f"expected shape {shape}, found {list(found_shape)}")
    scale_key = f"{layer}.{WEIGHT_SCALE}"
    if value_dtype is None and WEIGHT_SCALE in layouts:
        raise SpenseFormatError(f"layer {layer}, tensor {scale_key}: a weight_scale needs "
                                f"quantization_config.weight_dtype (FP8 values); this checkpoint declares none")
    if value_dtype is not None:
        if WEIGHT_SCALE not in layouts:
            raise SpenseFormatError(f"layer {layer}: missing tensor {scale_key} (FP8 values need their scales)")
        found_shape, found_dtype = layouts[WEIGHT_SCALE]
        if list(found_shape) != [n] or found_dtype != torch.float32:
            raise SpenseFormatError(f"layer {layer}, tensor {scale_key}: expected torch.float32 of shape [{n}], "
                                    f"found {found_dtype} of shape {list(found_shape)}")
    return dense_per_chunk


def validate(packed: PackedSpenseWeight, chunk_size: int, layer: str,
             expected_shape: tuple[int, int] | None = None, value_dtype: torch.dtype | None = None) -> int:
    """Reject any inconsistency in one layer's tensors, naming the layer, tensor, expected and found;
    return its dense groups per chunk. ``value_dtype`` as in ``check_layout``."""
    for tensor in LAYER_TENSORS:
        value = getattr(packed, tensor.value)
        if not isinstance(value, torch.Tensor):
            _fail(layer, tensor, f"expected a tensor, found {type(value).__name__}")
    layouts = {t: (tuple(getattr(packed, t.value).shape), getattr(packed, t.value).dtype) for t in LAYER_TENSORS}
    if packed.weight_scale is not None:
        layouts[WEIGHT_SCALE] = (tuple(packed.weight_scale.shape), packed.weight_scale.dtype)
    dense_per_chunk = check_layout(layouts, chunk_size, layer, expected_shape, value_dtype)
    if packed.weight_scale is not None and not (torch.isfinite(packed.weight_scale).all()
                                                and (packed.weight_scale > 0).all()):
        raise SpenseFormatError(f"layer {layer}, tensor {layer}.{WEIGHT_SCALE}: every scale must be finite and "
                                f"positive, found min {packed.weight_scale.min().item():g}")
    in_mask = check_dense_mask(packed.dense_mask, chunk_size, layer)
    if in_mask != dense_per_chunk:
        _fail(layer, SpenseTensor.DENSE_MASK,
              f"marks {in_mask} dense groups per chunk, dense_weight's width holds {dense_per_chunk}")
    kept = sparse_indices(packed.sparse_meta)
    bad = kept[..., 0] >= kept[..., 1]
    if bad.any():
        row, group = (int(i) for i in bad.nonzero()[0])
        _fail(layer, SpenseTensor.SPARSE_META,
              f"{int(bad.sum())} invalid index pairs (first must be < second, both in 0..3), e.g. row {row} "
              f"group {group}: {kept[row, group].tolist()}")
    return dense_per_chunk


def layer_names(keys: Iterable[str]) -> list[str]:
    """Names of the Spense layers among state-dict keys (those with a ``dense_mask``)."""
    suffix = "." + SpenseTensor.DENSE_MASK.value
    return sorted(key[: -len(suffix)] for key in keys if key.endswith(suffix))
