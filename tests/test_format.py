"""The Spense format: exact round trips, the packed-form reference GEMM, and rejection of every bad tensor."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import random_dense_mask, random_pruned_weight
from vllm_spense.format import (GROUP_SIZE, PackedSpenseWeight, SpenseFormatError, SpenseQuantConfig, SpenseTensor,
                                check_dense_mask, dense_groups_per_chunk, pack, sparse_indices, unpack, validate)
from vllm_spense.kernels.reference import spense_linear

# (N, K, chunk, dense groups per chunk): ragged rows, several chunks, pure 2:4 included.
SHAPES = [(37, 192, 64, 2), (5, 256, 128, 8), (130, 128, 128, 0), (3, 64, 32, 6), (64, 96, 32, 2)]
LAYER = "model.layers.3.mlp.down_proj"


def make(shape, generator, dtype=torch.float32):
    n, k, chunk, dense = shape
    mask = random_dense_mask(k, chunk, dense, generator)
    weight = random_pruned_weight(n, k, mask, generator, dtype)
    return weight, mask, pack(weight, mask, chunk, LAYER)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pack_unpack_is_exact(shape, dtype, generator):
    weight, mask, packed = make(shape, generator, dtype)
    n, k, chunk, dense = shape
    validate(packed, chunk, LAYER, expected_shape=(n, k))
    assert packed.dense_weight.shape == (n, dense * (k // chunk) * GROUP_SIZE)
    assert torch.equal(unpack(packed), weight)
    # The layout is what docs/FORMAT.md says: dense groups first-to-last, then each 2:4 group's two values.
    groups = weight.view(n, -1, GROUP_SIZE)
    assert torch.equal(packed.dense_weight, groups[:, mask].reshape(n, -1))
    kept = sparse_indices(packed.sparse_meta)
    assert (kept[..., 0] < kept[..., 1]).all()
    assert torch.equal(packed.sparse_weight.view(n, -1, 2), groups[:, ~mask].gather(-1, kept))


def test_metadata_bit_order():
    """Group 0 keeps positions (1, 3) -> nibble 0b1101; group 1 keeps (0, 2) -> 0b1000; byte = 0x8D."""
    weight = torch.tensor([[0.0, 1.0, 0.0, 2.0, 3.0, 0.0, 4.0, 0.0] + [0.0] * 24])
    weight[0, 8::4] = 5.0  # groups 2..7 keep (0, 1): second value zero-filled
    packed = pack(weight, torch.zeros(8, dtype=torch.bool), 32)
    assert packed.sparse_meta[0, 0].item() == 0x8D
    assert packed.sparse_meta[0, 1].item() == 0x44  # (0, 1) -> 0b0100 twice
    assert packed.sparse_weight[0, :4].tolist() == [1.0, 2.0, 3.0, 4.0]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("m", [1, 3, 17])
def test_reference_gemm_matches_dense_reconstruction(shape, m, generator):
    weight, mask, packed = make(shape, generator)
    x = torch.randn(m, 2, shape[1], generator=generator)
    bias = torch.randn(shape[0], generator=generator)
    expected = x.double() @ weight.double().t() + bias.double()
    got = spense_linear(x, packed, bias)
    assert got.shape == (m, 2, shape[0])
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)


def test_pack_rejects_a_dense_2_4_group(generator):
    weight, mask, _ = make((8, 64, 32, 2), generator)
    sparse_group = int((~mask).nonzero()[0])
    weight[5, sparse_group * 4:(sparse_group + 1) * 4] = 1.0
    with pytest.raises(SpenseFormatError, match=f"layer {LAYER}: 1 2:4 groups hold more than 2"):
        pack(weight, mask, 32, LAYER)


def _replace(packed: PackedSpenseWeight, **changes) -> PackedSpenseWeight:
    return packed._replace(**changes)


def _bad_cases(packed: PackedSpenseWeight):
    meta = packed.sparse_meta.clone()
    meta[2, 1] = (meta[2, 1] & 0xF0) | 0b0111  # first index 3, second 1
    mask = packed.dense_mask.clone().view(-1, 8)  # move a dense group from chunk 0 to chunk 1
    mask[0, mask[0].nonzero()[0]] = False
    mask[1, (~mask[1]).nonzero()[0]] = True
    mask = mask.reshape(-1)
    return {
        "dtype of values": (_replace(packed, dense_weight=packed.dense_weight.double()), SpenseTensor.DENSE_WEIGHT,
                            "expected dtype in"),
        "mixed dtypes": (_replace(packed, sparse_weight=packed.sparse_weight.half()), SpenseTensor.SPARSE_WEIGHT,
                         "expected dtype torch.float32"),
        "meta dtype": (_replace(packed, sparse_meta=packed.sparse_meta.to(torch.int32)), SpenseTensor.SPARSE_META,
                       "expected dtype torch.uint8"),
        "mask dtype": (_replace(packed, dense_mask=packed.dense_mask.to(torch.uint8)), SpenseTensor.DENSE_MASK,
                       "expected a 1-D bool tensor"),
        "dense shape": (_replace(packed, dense_weight=packed.dense_weight[:, :-4]), SpenseTensor.DENSE_WEIGHT,
                        "expected shape"),
        "sparse rows": (_replace(packed, sparse_weight=packed.sparse_weight[:-1]), SpenseTensor.SPARSE_WEIGHT,
                        "expected shape"),
        "meta shape": (_replace(packed, sparse_meta=packed.sparse_meta[:, :-1]), SpenseTensor.SPARSE_META,
                       "expected shape"),
        "meta value": (_replace(packed, sparse_meta=meta), SpenseTensor.SPARSE_META, "row 2 group 2: \\[3, 1\\]"),
        "unbalanced mask": (_replace(packed, dense_mask=mask), SpenseTensor.DENSE_MASK, "unbalanced mask"),
        "partial chunk": (_replace(packed, dense_mask=packed.dense_mask[:-1]), SpenseTensor.DENSE_MASK,
                          "not a whole number of 32-channel chunks"),
    }


@pytest.mark.parametrize("case", ["dtype of values", "mixed dtypes", "meta dtype", "mask dtype", "dense shape",
                                  "sparse rows", "meta shape", "meta value", "unbalanced mask", "partial chunk"])
def test_validate_rejects_with_layer_and_tensor(case, generator):
    _, _, packed = make((11, 96, 32, 2), generator)
    validate(packed, 32, LAYER)
    bad, tensor, message = _bad_cases(packed)[case]
    with pytest.raises(SpenseFormatError, match=message) as error:
        validate(bad, 32, LAYER)
    assert f"layer {LAYER}, tensor {tensor.key(LAYER)}" in str(error.value)


def test_validate_rejects_wrong_layer_shape(generator):
    _, _, packed = make((11, 96, 32, 2), generator)
    with pytest.raises(SpenseFormatError, match="expected 32 groups \\(K=128\\), found 24 \\(K=96\\)"):
        validate(packed, 32, LAYER, expected_shape=(11, 128))
    with pytest.raises(SpenseFormatError, match="dense_weight: expected shape \\[12, 24\\], found \\[11, 24\\]"):
        validate(packed, 32, LAYER, expected_shape=(12, 96))


def test_odd_dense_count_is_rejected():
    mask = torch.zeros(16, dtype=torch.bool)
    mask[[0, 8]] = True  # one dense group per 32-channel chunk: metadata would not fill whole bytes
    with pytest.raises(SpenseFormatError, match="expected an even number"):
        check_dense_mask(mask, 32, LAYER)
    with pytest.raises(SpenseFormatError, match="use a multiple of 0.0625"):
        dense_groups_per_chunk(0.03125, 128)
    assert dense_groups_per_chunk(0.25, 128) == 8


def test_quant_config_round_trip_and_errors():
    config = SpenseQuantConfig(dense_fraction=0.125, chunk_size=64, pruning={"method": "spensegpt"})
    data = config.to_dict()
    assert data["quant_method"] == "spense" and data["format_version"] == 1
    assert SpenseQuantConfig.from_dict(data) == config
    assert config.is_ignored("lm_head") and config.is_ignored("model.embed_tokens")
    assert not config.is_ignored("model.layers.0.mlp.up_proj")
    for change, message in [({"format_version": 2}, "unknown format_version 2"),
                            ({"quant_method": "compressed-tensors"}, "quant_method must be 'spense'"),
                            ({"group_size": 8}, "group_size must be 4"),
                            ({"chunk_size": 12}, "chunk_size must be a positive multiple of 8"),
                            ({"dense_fraction": 1.0}, "dense_fraction must be in \\[0, 1\\)"),
                            ({"sparsity_scheme": "2:4"}, "unknown keys \\['sparsity_scheme'\\]")]:
        with pytest.raises(SpenseFormatError, match=message):
            SpenseQuantConfig.from_dict({**data, **change})
