"""The cuSPARSELt prefill path's CPU-side logic: sharing the kept values with cuSPARSELt's compressed
operand (the metadata rebuilt where it placed a group's zeros elsewhere), the operand checks, the choice
of path, and the path around the cuSPARSELt call, with cuSPARSELt (CUDA only) stood in for by PyTorch.
cuSPARSELt itself runs on GPUs only: benchmarks/check_kernels_gpu.py and check_plugin_gpu.py check its
products against fp64 there. Not covered here: the fallback during CUDA-graph capture.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import random_dense_mask, random_pruned_weight
from vllm_spense.format import GROUP_SIZE, pack, sparse_indices
from vllm_spense.kernels import cusparselt
from vllm_spense.kernels import spense_gemm as spense_gemm_module
from vllm_spense.kernels.spense_gemm import (CAPTURED_MAX_M, CUBLAS_AND_CUSPARSELT, MMA_MAX_M, OVERLAP_MAX_ROWS,
                                             SPARSE_CORES_MIN_M, SPARSE_CORES_ROW_STEP, UNPACK_AND_CUBLAS,
                                             SpenseGemmWeight, choose_config, spense_gemm, warm_up)

PAIRS = list(itertools.combinations(range(GROUP_SIZE), 2))


def packed_case(n: int, k: int, dense_per_chunk: int, zero_fraction: float = 0.0):
    """(weight as fp32 [N, K], SpenseGemmWeight) with random 2:4 groups, some values exactly 0."""
    generator = torch.Generator().manual_seed(torch.seed() % 2**31)
    mask = random_dense_mask(k, 128, dense_per_chunk, generator)
    weight = random_pruned_weight(n, k, mask, generator)
    weight[torch.rand(n, k, generator=generator) < zero_fraction] = 0
    return weight, SpenseGemmWeight.from_packed(pack(weight, mask, 128)), generator


def region_from_weight(weight: SpenseGemmWeight, dense_weight: torch.Tensor) -> torch.Tensor:
    """The 2:4 region [N, Ks] straight from the unpacked weight's 2:4 channels (not from the packed tensors)."""
    return dense_weight[:, weight.sparse_channels.long()]


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
    weight, gemm, generator = packed_case(37, 256, 8, zero_fraction=0.3)  # 48 2:4 groups a row
    rows, region = 37, region_from_weight(gemm, weight).view(37, -1, GROUP_SIZE)
    groups = region.shape[1]
    values = another_storage(region, generator)
    meta = cusparselt._metadata_for(region, values)
    assert meta is not None and meta.shape == (rows, groups // 2) and meta.dtype == torch.uint8
    rebuilt = torch.zeros_like(region).scatter_(-1, sparse_indices(meta), values)  # format's reading of meta
    assert torch.equal(rebuilt, region)
    assert (region == 0).sum(-1).ge(3).any(), "the case must hold groups with fewer than two nonzeros"


def test_metadata_is_none_where_values_fit_no_positions():
    weight, gemm, generator = packed_case(4, 128, 8, zero_fraction=0.3)
    region = region_from_weight(gemm, weight).view(4, -1, GROUP_SIZE)
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


def compressed_like_cusparselt(region: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """What ``torch._cslt_compress`` returns for a 2:4 region [N, Ks] (a CUDA-only op; its layout measured on
    the GPU, docs/KERNELS.md): the kept values row by row, here stored at another pair of positions than
    ``pack`` chose wherever a group allows it, then metadata (filler here: never read on this side)."""
    n = region.shape[0]
    values = another_storage(region.view(n, -1, GROUP_SIZE), generator).reshape(-1)
    return torch.cat((values, torch.full((region.numel() // 8,), 7.0, dtype=region.dtype))).view(n, -1)


def fake_sparse_product(region: torch.Tensor):
    """``cusparselt.add_sparse_product`` (CUDA only) in plain PyTorch for this region: y += x_s @ region^T, or
    y = x_s @ region^T without ``accumulate``; each call's ``accumulate`` is recorded in ``.accumulates``."""
    def add_sparse_product(compressed, x_sparse, y, accumulate=True):
        add_sparse_product.accumulates.append(accumulate)
        product = (x_sparse.double() @ region.double().t()).to(y.dtype)
        if accumulate:
            y += product
        else:
            y.copy_(product)
    add_sparse_product.accumulates = []
    return add_sparse_product


def test_compress_shares_the_values_and_rebuilds_the_metadata(monkeypatch):
    weight, gemm, generator = packed_case(48, 512, 8, zero_fraction=0.3)
    region = region_from_weight(gemm, weight)
    fake = compressed_like_cusparselt(region, generator)
    monkeypatch.setattr(torch, "_cslt_compress", lambda dense: fake if torch.equal(dense, region) else None)
    monkeypatch.setattr(cusparselt, "add_sparse_product", fake_sparse_product(region))
    compressed, meta = cusparselt.compress(gemm.sparse_weight, gemm.sparse_meta, row_stride=512)
    values = compressed[:gemm.sparse_weight.numel()].view(48, -1, 2)
    assert torch.equal(values.reshape(-1), fake.reshape(-1)[:values.numel()])
    assert not torch.equal(meta, gemm.sparse_meta), "the case must make cuSPARSELt's choice differ from pack's"
    rebuilt = torch.zeros(48, region.shape[1] // GROUP_SIZE, GROUP_SIZE).scatter_(-1, sparse_indices(meta), values)
    assert torch.equal(rebuilt.view(48, -1), region)


def test_compress_refuses_an_operand_that_loses_a_value(monkeypatch, caplog):
    weight, gemm, generator = packed_case(32, 256, 8)
    region = region_from_weight(gemm, weight)
    fake = compressed_like_cusparselt(region, generator).clone()
    fake.view(-1)[5] = 0.0  # one kept value dropped
    monkeypatch.setattr(torch, "_cslt_compress", lambda dense: fake)
    monkeypatch.setattr(cusparselt, "add_sparse_product", fake_sparse_product(region))
    assert cusparselt.compress(gemm.sparse_weight, gemm.sparse_meta, row_stride=256) is None
    assert "stays off cuSPARSELt" in caplog.text and "do not fit any pair" in caplog.text


@pytest.mark.parametrize("dense_per_chunk", [0, 8])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("rows", [SPARSE_CORES_MIN_M + 7, 2 * SPARSE_CORES_ROW_STEP, MMA_MAX_M + 45])
@pytest.mark.parametrize("overlap", [None, True])
def test_path_on_sparse_cores_matches_fp64(monkeypatch, dense_per_chunk, with_bias, rows, overlap):
    """The path around the cuSPARSELt call: x permuted into whole 128-row steps, the dense region by torch.mm
    with the bias, the 2:4 product added onto it (by default) or, with ``overlap_regions`` up to
    OVERLAP_MAX_ROWS rows, written apart and the two summed, the padding rows dropped, ``out`` filled
    (cuSPARSELt stood in for by plain PyTorch, the second stream by running in turn; fp32 in Triton's
    interpreter)."""
    weight, gemm, _ = packed_case(40, 256, dense_per_chunk)
    gemm = dataclasses.replace(gemm, sparse_compressed=torch.empty(1))
    fake = fake_sparse_product(region_from_weight(gemm, weight))
    monkeypatch.setattr(cusparselt, "add_sparse_product", fake)
    x, bias = torch.randn(rows, 256), torch.randn(40) if with_bias else None
    out = torch.full((x.shape[0], 40), float("nan"))
    spense_gemm(x, gemm, bias, out=out, config=dataclasses.replace(CUBLAS_AND_CUSPARSELT, overlap_regions=overlap))
    reference = x.double() @ weight.double().t() + (bias.double() if with_bias else 0)
    assert ((out.double() - reference).norm() / reference.norm()).item() < 1e-5
    padded = -(-rows // SPARSE_CORES_ROW_STEP) * SPARSE_CORES_ROW_STEP
    wanted = spense_gemm_module.OVERLAP_REGIONS if overlap is None else overlap
    assert fake.accumulates == [not (wanted and dense_per_chunk > 0 and padded <= OVERLAP_MAX_ROWS)]


@pytest.mark.parametrize("switch", [False, True])
def test_the_default_config_follows_the_switch(monkeypatch, switch):
    """With no overlap_regions in the config (what vLLM's calls use), OVERLAP_REGIONS decides."""
    weight, gemm, _ = packed_case(40, 256, 8)
    gemm = dataclasses.replace(gemm, sparse_compressed=torch.empty(1))
    fake = fake_sparse_product(region_from_weight(gemm, weight))
    monkeypatch.setattr(cusparselt, "add_sparse_product", fake)
    monkeypatch.setattr(spense_gemm_module, "OVERLAP_REGIONS", switch)
    x = torch.randn(SPARSE_CORES_MIN_M + 3, 256)
    reference = x.double() @ weight.double().t()
    assert ((spense_gemm(x, gemm).double() - reference).norm() / reference.norm()).item() < 1e-5
    assert fake.accumulates == [not switch]


@pytest.mark.parametrize("value, expected", [(None, False), ("0", False), ("1", True)])
def test_overlap_is_opt_in_through_the_environment(value, expected):
    """Two streams only where the server's environment asks for them (read at import)."""
    env = {k: v for k, v in os.environ.items() if k != "SPENSE_OVERLAP_REGIONS"}
    if value is not None:
        env["SPENSE_OVERLAP_REGIONS"] = value
    code = "from vllm_spense.kernels.spense_gemm import OVERLAP_REGIONS; print(OVERLAP_REGIONS)"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == str(expected)


@pytest.mark.parametrize("m", [SPARSE_CORES_MIN_M + 30, MMA_MAX_M + 3])  # the MMA kernel / the expansion path
def test_a_size_cusparselt_refuses_takes_the_path_without_sparse_cores(monkeypatch, m):
    weight, gemm, _ = packed_case(40, 256, 8)
    gemm = dataclasses.replace(gemm, sparse_compressed=torch.empty(1))
    calls = []

    def refuse(compressed, x_sparse, y, accumulate=True):
        calls.append(x_sparse.shape)
        raise cusparselt.CusparseLtError("cuSPARSELt: refused (test)")
    monkeypatch.setattr(cusparselt, "add_sparse_product", refuse)
    x = torch.randn(m, 256)
    reference = x.double() @ weight.double().t()
    y = spense_gemm(x, gemm)
    assert calls, "the sparse-cores path was not tried"
    assert ((y.double() - reference).norm() / reference.norm()).item() < 1e-5


def test_fp16_fp32_and_fp8_weights_stay_off_cusparselt():
    """bf16 only: with fp16 values cuSPARSELt's algorithm search crashed the CUDA context (docs/KERNELS.md)."""
    cuda = torch.device("cuda")
    for dtype in (torch.float16, torch.float32, torch.float8_e4m3fn):
        assert not cusparselt.available(cuda, dtype)
    assert not cusparselt.available(torch.device("cpu"), torch.bfloat16)


def test_cusparselt_takes_batches_from_its_min_rows_and_other_weights_keep_the_mma_kernel():
    cpu = torch.device("cpu")
    for m in (1, 2, 16, SPARSE_CORES_MIN_M - 1):
        assert choose_config(m, 6144, 4096, cpu, sparse_cores=True).kernel != "sparse_cores"
    for m in (SPARSE_CORES_MIN_M, MMA_MAX_M, MMA_MAX_M + 1, 2048):
        assert choose_config(m, 6144, 4096, cpu, sparse_cores=True) == CUBLAS_AND_CUSPARSELT
    assert choose_config(MMA_MAX_M, 6144, 4096, cpu).kernel == "mma"
    assert choose_config(MMA_MAX_M + 1, 6144, 4096, cpu) == UNPACK_AND_CUBLAS


def test_sparse_cores_config_needs_a_compressed_weight():
    _, gemm, _ = packed_case(48, 256, 8)
    with pytest.raises(ValueError, match="with_sparse_cores"):
        spense_gemm(torch.randn(300, 256), gemm, config=CUBLAS_AND_CUSPARSELT)


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


def test_plans_of_up_to_512_rows_get_their_own_algorithm_search():
    """Longer plans share the search on SEARCH_ROWS rows, built while serving; shorter ones (the sizes vLLM
    captures, built at load) are timed on their own rows, where the 4096-row choice ran up to 1.96x slower."""
    searched = [cusparselt._search_rows(rows) for rows in (128, 384, cusparselt.SEARCH_OWN_ROWS_MAX, 640, 8192)]
    assert searched == [128, 384, cusparselt.SEARCH_OWN_ROWS_MAX, cusparselt.SEARCH_ROWS, cusparselt.SEARCH_ROWS]


def test_warm_up_runs_cusparselt_at_every_captured_row_step_and_checks_against_fp64(monkeypatch):
    """The load-time warm-up takes the cuSPARSELt path at each 128-row step from SPARSE_CORES_MIN_M to one
    past vLLM's largest captured batch, so their plans exist before any CUDA-graph capture."""
    weight, gemm, _ = packed_case(40, 256, 8)
    gemm = dataclasses.replace(gemm, sparse_compressed=torch.empty(1))
    fake, rows = fake_sparse_product(region_from_weight(gemm, weight)), []

    def recording(compressed, x_sparse, y, accumulate=True):
        rows.append(x_sparse.shape[0])
        fake(compressed, x_sparse, y, accumulate)
    monkeypatch.setattr(cusparselt, "add_sparse_product", recording)
    warm_up(gemm, torch.float32, torch.randn(40))
    step = SPARSE_CORES_ROW_STEP
    assert sorted(set(rows)) == list(range(step, CAPTURED_MAX_M + step + 1, step))
    x = torch.randn(SPARSE_CORES_MIN_M, 256)  # and the first size on the path is right
    reference = x.double() @ weight.double().t()
    assert ((spense_gemm(x, gemm).double() - reference).norm() / reference.norm()).item() < 1e-5
