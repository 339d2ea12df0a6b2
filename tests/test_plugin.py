"""The vLLM plugin without a server: registration, config, the custom op, and vLLM's own loaders sharding
Spense tensors across tensor-parallel ranks (merged qkv / gate_up and row-parallel layers)."""

from __future__ import annotations

from contextlib import ExitStack
from unittest import mock

import pytest
import torch

pytest.importorskip("vllm")

from tests.helpers import random_dense_mask, random_pruned_weight  # noqa: E402

from vllm_spense.format import (SpenseFormatError, SpenseQuantConfig, fp8_round, fp8_scales, pack,  # noqa: E402
                                unpack)

CHUNK = 64
RHO = 0.25
QKV = "model.layers.0.self_attn.qkv_proj"
O_PROJ = "model.layers.0.self_attn.o_proj"
GATE_UP = "model.layers.0.mlp.gate_up_proj"


@pytest.fixture(scope="module")
def vllm_env():
    """vLLM's config context and a one-process model-parallel group; ranks are then simulated."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import (destroy_distributed_environment, destroy_model_parallel,
                                  init_distributed_environment, initialize_model_parallel)

    import vllm_spense
    from vllm_spense.local_server import free_port

    vllm_spense.register()
    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"tcp://127.0.0.1:{free_port()}")
        initialize_model_parallel(1)
        yield
        destroy_model_parallel()
        destroy_distributed_environment()


ATTN, MLP = "model.layers.0.self_attn", "model.layers.0.mlp"
# An adaptive allocation: every merged layer's parts share one fraction, layers differ.
MIXED = {**{f"{ATTN}.{p}_proj": 0.5 for p in "qkv"}, f"{ATTN}.o_proj": 0.0,
         f"{MLP}.gate_proj": 0.125, f"{MLP}.up_proj": 0.125}


def spense_config(fractions: dict | None = None, fp8: bool = False):
    from vllm_spense.quant_config import SpenseConfig

    config = SpenseConfig(SpenseQuantConfig(dense_fraction=RHO, chunk_size=CHUNK, dense_fractions=fractions or {},
                                            weight_dtype="float8_e4m3fn" if fp8 else None))
    config.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"],
                                     "gate_up_proj": ["gate_proj", "up_proj"]}
    return config


def as_rank(rank: int, size: int) -> ExitStack:
    """Make vLLM's layers and parameters believe they run on ``rank`` of ``size``."""
    import vllm.model_executor.layers.linear as linear
    import vllm.model_executor.parameter as parameter

    stack = ExitStack()
    for module in (linear, parameter):
        stack.enter_context(mock.patch.object(module, "get_tensor_model_parallel_rank", return_value=rank))
        stack.enter_context(mock.patch.object(module, "get_tensor_model_parallel_world_size", return_value=size))
    return stack


def packed_parts(shapes: dict[str, tuple[int, int]], generator, shared_mask: bool = True, rho: float = RHO,
                 fp8: bool = False):
    """Random pruned weights (one mask for all parts when shared) and their Spense tensors; with ``fp8`` the
    weights are on the FP8 grid of their per-row scales and packed as FP8 values + weight_scale."""
    k = next(iter(shapes.values()))[1]
    dense = int(rho * CHUNK / 4)
    mask = random_dense_mask(k, CHUNK, dense, generator)
    weights, packed = {}, {}
    for name, (n, k) in shapes.items():
        part_mask = mask if shared_mask else random_dense_mask(k, CHUNK, dense, generator)
        weights[name] = random_pruned_weight(n, k, part_mask, generator)
        scale = fp8_scales(weights[name]) if fp8 else None
        if fp8:
            weights[name] = fp8_round(weights[name], scale)
        packed[name] = pack(weights[name], part_mask, CHUNK, name, weight_scale=scale)
    return weights, packed


def load(layer, packed: dict, shard_ids: dict) -> None:
    """What vLLM's model loader does: every checkpoint tensor through the parameter's weight_loader."""
    for name, pw in packed.items():
        for tensor, value in pw.tensors("").items():
            param = getattr(layer, tensor[1:])
            if shard_ids[name] is None:
                param.weight_loader(param, value)
            else:
                param.weight_loader(param, value, shard_ids[name])
    layer.quant_method.process_weights_after_loading(layer)


def build_qkv(rank: int, size: int, fractions: dict | None = None, fp8: bool = False):
    from vllm.model_executor.layers.linear import QKVParallelLinear

    with as_rank(rank, size):
        return QKVParallelLinear(256, 32, 4, 2, bias=False, quant_config=spense_config(fractions, fp8), prefix=QKV)


def rank_weight(layer) -> torch.Tensor:
    from vllm_spense.linear_kernel import packed_weight

    return unpack(packed_weight(layer))


@pytest.mark.parametrize("fractions,fp8", [(None, False), (MIXED, False), (None, True)],
                         ids=["uniform", "mixed", "fp8"])
@pytest.mark.parametrize("tp", [1, 2])
def test_tp_shards_reassemble_merged_and_row_parallel(vllm_env, tp, fractions, fp8, generator):
    """FP8 included: weight_scale splits with the rows of merged and column-parallel layers and stays whole
    on row-parallel ones."""
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear, RowParallelLinear

    def rho(name):
        return (fractions or {}).get(name, RHO)

    qkv_shapes = {"q": (128, 256), "k": (64, 256), "v": (64, 256)}  # 4 query / 2 KV heads of 32
    qkv_w, qkv_p = packed_parts(qkv_shapes, generator, rho=rho(f"{ATTN}.q_proj"), fp8=fp8)
    gu_w, gu_p = packed_parts({"gate": (192, 256), "up": (192, 256)}, generator, rho=rho(f"{MLP}.gate_proj"), fp8=fp8)
    o_w, o_p = packed_parts({"o": (256, 128 * tp)}, generator, rho=rho(f"{ATTN}.o_proj"), fp8=fp8)
    o_bias = torch.randn(256, generator=generator)
    x = torch.randn(5, 256, generator=generator)
    x_o = torch.randn(5, 128 * tp, generator=generator)
    rows, gate_up, o_out, o_cols = {p: [] for p in "qkv"}, {p: [] for p in ("gate", "up")}, 0, []
    for rank in range(tp):
        qkv = build_qkv(rank, tp, fractions, fp8)
        with as_rank(rank, tp):
            gu = MergedColumnParallelLinear(256, [192, 192], bias=False, quant_config=spense_config(fractions, fp8),
                                            prefix=GATE_UP)
            o = RowParallelLinear(128 * tp, 256, bias=True, quant_config=spense_config(fractions, fp8), prefix=O_PROJ)
            load(qkv, qkv_p, {"q": "q", "k": "k", "v": "v"})
            load(gu, gu_p, {"gate": 0, "up": 1})
            load(o, o_p, {"o": None})
            o.bias.data.copy_(o_bias)
        assert qkv.dense_weight.dtype == (torch.float8_e4m3fn if fp8 else torch.float32)
        assert hasattr(o, "weight_scale") == fp8
        w = rank_weight(qkv)
        sizes = [n // tp for n, _ in qkv_shapes.values()]
        for part, piece in zip("qkv", w.split(sizes)):
            rows[part].append(piece)
        for part, piece in zip(("gate", "up"), rank_weight(gu).split(192 // tp)):
            gate_up[part].append(piece)
        o_cols.append(rank_weight(o))
        # Forward through the custom op on this rank's shard, against fp64 math on the shard.
        x64 = x.double()
        torch.testing.assert_close(qkv(x)[0].double(), x64 @ w.double().T, rtol=1e-5, atol=1e-4)
        x_shard = x_o[:, rank * 128:(rank + 1) * 128]
        bias = o_bias if rank == 0 else None
        o_out = o_out + o.quant_method.apply(o, x_shard, bias).double()
    for part in "qkv":
        assert torch.equal(torch.cat(rows[part]), qkv_w[part])  # exact: the original weight, reassembled
    for part in ("gate", "up"):
        assert torch.equal(torch.cat(gate_up[part]), gu_w[part])
    assert torch.equal(torch.cat(o_cols, dim=1), o_w["o"])
    torch.testing.assert_close(o_out, x_o.double() @ o_w["o"].double().T + o_bias.double(), rtol=1e-5, atol=1e-4)


def test_merged_parts_must_share_one_mask(vllm_env, generator):
    _, packed = packed_parts({"q": (128, 256), "k": (64, 256), "v": (64, 256)}, generator, shared_mask=False)
    qkv = build_qkv(0, 1)
    with pytest.raises(SpenseFormatError, match=f"layer {QKV}, tensor model.layers.0.self_attn.k_proj.dense_mask: "
                                                f"differs from model.layers.0.self_attn.q_proj.dense_mask"):
        load(qkv, packed, {"q": "q", "k": "k", "v": "v"})


def test_mixed_fractions_size_each_layer_and_merged_parts_must_agree(vllm_env, generator):
    from vllm.model_executor.layers.linear import RowParallelLinear

    qkv = build_qkv(0, 1, MIXED)
    assert qkv.dense_weight.shape == (256, 128)  # 0.5 of K=256: 32 dense groups of 4
    with pytest.raises(SpenseFormatError, match=f"layer {O_PROJ}, tensor {ATTN}.o_proj.dense_weight: checkpoint "
                                                f"shape \\[256, 64\\] does not fit this layer's \\[256, 0\\]"):
        o = RowParallelLinear(256, 256, bias=False, quant_config=spense_config(MIXED), prefix=O_PROJ)
        load(o, packed_parts({"o": (256, 256)}, generator)[1], {"o": None})  # the checkpoint's o is at 0.25
    with pytest.raises(SpenseFormatError, match=f"layer {QKV}: vLLM merges .* different dense fractions"):
        build_qkv(0, 1, {**MIXED, f"{ATTN}.k_proj": 0.25})


def test_missing_part_and_bad_tensors_fail_at_load(vllm_env, generator):
    _, packed = packed_parts({"q": (128, 256), "k": (64, 256), "v": (64, 256)}, generator)
    qkv = build_qkv(0, 1)
    with pytest.raises(SpenseFormatError, match="tensors \\['model.layers.0.self_attn.k_proj.dense_weight'"):
        load(qkv, {"q": packed["q"], "v": packed["v"]}, {"q": "q", "v": "v"})
    qkv = build_qkv(0, 1)
    bad = packed["v"]._replace(sparse_meta=packed["v"].sparse_meta.to(torch.int16))
    with pytest.raises(SpenseFormatError, match="tensor model.layers.0.self_attn.v_proj.sparse_meta: expected dtype"):
        load(qkv, {**packed, "v": bad}, {"q": "q", "k": "k", "v": "v"})
    qkv = build_qkv(0, 1)
    bad = packed["k"]._replace(dense_weight=packed["k"].dense_weight[:, :-4])
    with pytest.raises(SpenseFormatError, match="tensor model.layers.0.self_attn.k_proj.dense_weight: checkpoint "
                                                "shape \\[64, 60\\] does not fit"):
        load(qkv, {**packed, "k": bad}, {"q": "q", "k": "k", "v": "v"})
    qkv = build_qkv(0, 1)
    meta = packed["q"].sparse_meta.clone()
    meta[3, 2] = 0x33  # both nibbles: first index 3, second index 0
    q_proj = "model.layers.0.self_attn.q_proj"
    with pytest.raises(SpenseFormatError, match=f"layer {q_proj}, tensor {q_proj}.sparse_meta: 2 invalid index pairs"):
        load(qkv, {**packed, "q": packed["q"]._replace(sparse_meta=meta)}, {"q": "q", "k": "k", "v": "v"})


def test_fp8_weight_scale_errors_name_the_tensor(vllm_env, generator):
    from vllm.model_executor.layers.linear import RowParallelLinear

    _, packed = packed_parts({"q": (128, 256), "k": (64, 256), "v": (64, 256)}, generator, fp8=True)
    qkv = build_qkv(0, 1, fp8=True)
    bad = packed["k"]._replace(weight_scale=packed["k"].weight_scale[:-1])
    with pytest.raises(SpenseFormatError, match="tensor model.layers.0.self_attn.k_proj.weight_scale: checkpoint "
                                                "shape \\[63\\] does not fit"):
        load(qkv, {**packed, "k": bad}, {"q": "q", "k": "k", "v": "v"})
    qkv = build_qkv(0, 1, fp8=True)
    with pytest.raises(SpenseFormatError, match="tensor model.layers.0.self_attn.v_proj.dense_weight: expected "
                                                "dtype in \\['torch.float8_e4m3fn'\\], found torch.float32"):
        load(qkv, {**packed, "v": packed_parts({"v": (64, 256)}, generator)[1]["v"]}, {"q": "q", "k": "k", "v": "v"})
    with as_rank(0, 2):  # row-parallel: every rank needs all N scales
        o = RowParallelLinear(256, 256, bias=False, quant_config=spense_config(fp8=True), prefix=O_PROJ)
    _, o_packed = packed_parts({"o": (256, 256)}, generator, fp8=True)
    scale = o.weight_scale
    with pytest.raises(SpenseFormatError, match="tensor model.layers.0.self_attn.o_proj.weight_scale: checkpoint "
                                                "shape \\[128\\] does not fit"):
        scale.weight_loader(scale, o_packed["o"].weight_scale[:128])


def test_tp_split_off_chunk_boundary_is_refused(vllm_env):
    from vllm.model_executor.layers.linear import RowParallelLinear

    with as_rank(0, 2), pytest.raises(SpenseFormatError, match=f"layer {O_PROJ}: this rank holds 96 of its 192"):
        RowParallelLinear(192, 256, bias=False, quant_config=spense_config(), prefix=O_PROJ)


def test_ignored_layers_load_unquantized_and_mixed_merges_fail(vllm_env):
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    from vllm_spense.linear_method import SpenseLinearMethod
    from vllm_spense.quant_config import SpenseConfig

    qkv = build_qkv(0, 1)
    assert isinstance(qkv.quant_method, SpenseLinearMethod)
    config = SpenseConfig(SpenseQuantConfig(dense_fraction=RHO, chunk_size=CHUNK, ignore=("re:.*self_attn.*",)))
    config.packed_modules_mapping = spense_config().packed_modules_mapping
    assert isinstance(config.get_quant_method(qkv, QKV), UnquantizedLinearMethod)
    config = SpenseConfig(SpenseQuantConfig(dense_fraction=RHO, chunk_size=CHUNK, ignore=("k_proj",)))
    config.packed_modules_mapping = spense_config().packed_modules_mapping
    with pytest.raises(SpenseFormatError, match="merged layers must be pruned or skipped together"):
        config.get_quant_method(qkv, QKV)


def test_register_is_idempotent_and_declared():
    from importlib.metadata import entry_points

    import vllm_spense

    (entry,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "spense"]
    assert entry.value == "vllm_spense:register"
    vllm_spense.register()
    vllm_spense.register()
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config

    from vllm_spense.quant_config import SpenseConfig

    assert QUANTIZATION_METHODS.count("spense") == 1
    assert get_quantization_config("spense") is SpenseConfig


def test_config_from_checkpoint_and_flag_without_spense_config(tiny_checkpoint, tiny_model_dir):
    import json

    from vllm_spense.quant_config import SpenseConfig

    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert SpenseConfig.from_config(config["quantization_config"]).spense.dense_fraction == 0.25
    dense = json.loads((tiny_model_dir / "config.json").read_text())
    with pytest.raises(SpenseFormatError, match="no quantization_config with quant_method 'spense'"):
        SpenseConfig.from_config(dense)


@pytest.mark.parametrize("fp8", [False, True], ids=["float", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
# 15 rows: per-row gather; 36 rows: W rebuilt per call; 3-D x reshaped, 2-D x (what vLLM passes) taken as it is
@pytest.mark.parametrize("lead", [(3, 5), (4, 9), (15,), (36,)])
def test_custom_op_matches_reference_and_passes_opcheck(dtype, lead, fp8, generator):
    from vllm_spense.kernels.reference import group_channels
    from vllm_spense.ops import spense_linear

    mask = random_dense_mask(192, CHUNK, 4, generator)
    weight = random_pruned_weight(37, 192, mask, generator)
    scale = fp8_scales(weight) if fp8 else None
    weight = (fp8_round(weight, scale) if fp8 else weight).to(dtype)
    packed = pack(weight, mask, CHUNK, weight_scale=scale)
    perm = torch.cat(group_channels(mask)).to(torch.int32)
    bias = torch.randn(37, generator=generator, dtype=dtype)
    x = torch.randn(*lead, 192, generator=generator, dtype=dtype)
    args = (x, packed.dense_weight, packed.sparse_weight, packed.sparse_meta, mask, perm, bias, packed.weight_scale)
    y = spense_linear(*args)
    torch.testing.assert_close(y.double(), x.double() @ weight.double().T + bias.double(), rtol=1e-5, atol=1e-5)
    # opcheck's schema test compares inputs with a multiply that CPU torch lacks for float8: skip only it for FP8.
    checks = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.spense.linear.default, args, **({"test_utils": checks} if fp8 else {}))
