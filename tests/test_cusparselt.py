"""The cuSPARSELt prefill path's CPU-side logic: sharing the kept values with cuSPARSELt's compressed
operand (the metadata rebuilt where it placed a group's zeros elsewhere), the operand checks, and the
dispatch. cuSPARSELt itself runs on GPUs only: benchmarks/check_kernels_gpu.py and check_plugin_gpu.py
check its products against fp64 there.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from tests.helpers import random_dense_mask, random_pruned_weight
from vllm_spense.format import GROUP_SIZE, pack, sparse_indices
from vllm_spense.kernels import cusparselt
from vllm_spense.kernels.spense_gemm import (MMA_MAX_M, SPARSE_CORES_PREFILL, UNPACK_AND_CUBLAS, SpenseGemmWeight,
                                             choose_config, spense_gemm)

PAIRS = list(itertools.combinations(range(GROUP_SIZE), 2))


def groups_with_few_nonzeros(rows: int, groups: int, generator: torch.Generator) -> torch.Tensor:
    """A 2:4 region [rows, groups, 4] in fp16 where about a third of the groups keep one nonzero and a
    sixth none, so more than one pair of positions stores each of those groups."""
    values = torch.randn(rows, groups, GROUP_SIZE, generator=generator).to(torch.float16)
    keep = torch.rand(rows, groups, GROUP_SIZE, generator=generator).argsort(-1)[..., :2]
    region = torch.zeros_like(values).scatter_(-1, keep, values.gather(-1, keep))
    draw = torch.rand(rows, groups, generator=generator)
    one = (draw >= 1 / 6) & (draw < 0.5)
    region[one] = region[one].scatter(-1, keep[one][:, :1], 0.0)
    region[draw < 1 / 6] = 0
    return region


def another_storage(region: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each group's two stored values as another packer could choose them: a random ascending pair of
    positions that covers every nonzero of the group (not necessarily the lowest zeros, as ``pack`` takes)."""
    nonzero = region != 0
    choices = torch.rand(*region.shape[:2], len(PAIRS), generator=generator)
    for index, (i0, i1) in enumerate(PAIRS):
        covers = nonzero.sum(-1) == (nonzero[..., i0].int() + nonzero[..., i1].int())
        choices[..., index][~covers] = -1
    i0 = torch.tensor([p[0] for p in PAIRS])[choices.argmax(-1)]
    i1 = torch.tensor([p[1] for p in PAIRS])[choices.argmax(-1)]
    return torch.stack((region.gather(-1, i0[..., None]), region.gather(-1, i1[..., None])), -1).squeeze(-2)


def test_metadata_rebuilt_for_values_stored_at_other_positions():
    generator = torch.Generator().manual_seed(torch.seed() % 2**31)
    rows, groups = 37, 26  # an even number of groups: two a metadata byte
    region = groups_with_few_nonzeros(rows, groups, generator)
    values = another_storage(region, generator)
    meta = cusparselt._metadata_for(region, values)
    assert meta is not None and meta.shape == (rows, groups // 2) and meta.dtype == torch.uint8
    rebuilt = torch.zeros_like(region).scatter_(-1, sparse_indices(meta), values)  # format's reading of meta
    assert torch.equal(rebuilt, region)
    assert (region == 0).sum(-1).ge(3).any(), "the case must hold groups with fewer than two nonzeros"


def test_metadata_is_none_where_values_fit_no_positions():
    generator = torch.Generator().manual_seed(torch.seed() % 2**31)
    region = groups_with_few_nonzeros(4, 8, generator)
    values = another_storage(region, generator)
    nan = values.clone()
    nan[2, 5, 0] = float("nan")
    assert cusparselt._metadata_for(region, nan) is None
    # A group (a, 0, b, 0) stored as (0, b): positions 1 and 2 hold those, but a would be lost.
    a, b = torch.randn(2, generator=generator).tolist()
    region[1, 3] = torch.tensor([a, 0.0, b, 0.0])
    dropped = values.clone()
    dropped[1, 3] = torch.tensor([0.0, b])
    assert cusparselt._metadata_for(region, dropped) is None


def small_weight(dtype=torch.bfloat16) -> SpenseGemmWeight:
    generator = torch.Generator().manual_seed(torch.seed() % 2**31)
    mask = random_dense_mask(256, 128, 8, generator)
    return SpenseGemmWeight.from_packed(pack(random_pruned_weight(48, 256, mask, generator, dtype), mask, 128))


def test_weights_off_a_gpu_keep_the_expansion_path():
    weight = small_weight()
    assert not cusparselt.available(torch.device("cpu"), torch.bfloat16)
    assert weight.with_sparse_cores() is weight


def test_prefill_goes_to_cusparselt_only_past_the_mma_rows():
    cpu = torch.device("cpu")
    for m in (1, 2, 16, MMA_MAX_M):
        assert choose_config(m, 6144, 4096, cpu, sparse_cores=True).kernel != "sparse_cores"
    for m in (MMA_MAX_M + 1, 2048):
        assert choose_config(m, 6144, 4096, cpu, sparse_cores=True) == SPARSE_CORES_PREFILL
        assert choose_config(m, 6144, 4096, cpu) == UNPACK_AND_CUBLAS


def test_sparse_cores_config_needs_a_compressed_weight():
    weight = small_weight(torch.float32)
    with pytest.raises(ValueError, match="with_sparse_cores"):
        spense_gemm(torch.randn(300, 256), weight, config=SPARSE_CORES_PREFILL)


def test_operand_checks_name_what_is_wrong():
    n, ks = 32, 64
    compressed = torch.empty(n * ks // 2 + n * ks // 16, dtype=torch.bfloat16)
    y = torch.empty(5, n, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16"):
        cusparselt.check_operands(compressed, torch.empty(5, ks, dtype=torch.float16), y)
    strided = torch.empty(5, ks + 4, dtype=torch.bfloat16)[:, :ks]  # rows 136 bytes apart
    with pytest.raises(ValueError, match="x's row stride must be a multiple of 16 bytes"):
        cusparselt.check_operands(compressed, strided, y)
    with pytest.raises(ValueError, match=r"at least 1152 values, found 100"):
        cusparselt.check_operands(compressed[:100], torch.empty(5, ks, dtype=torch.bfloat16), y)
    with pytest.raises(ValueError, match=r"contiguous \[5, N\]"):
        cusparselt.check_operands(compressed, torch.empty(5, ks, dtype=torch.bfloat16), y[:4])
