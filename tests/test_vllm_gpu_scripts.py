"""The checkpoints benchmarks/vllm_gpu writes for real vLLM on the GPU, made here at a tiny size on the CPU:
the dense one holds the seeded weights, the Spense one passes the plugin's header check and unpacks to
the same weights pruned, the FP8 one to those weights rounded to FP8."""

from __future__ import annotations

import pathlib
import sys

import pytest
import torch

from vllm_spense.checkpoint import check_checkpoint_headers, dense_state_dict, read_config, read_tensors

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "vllm_gpu"))
import bench_serving  # noqa: E402  (a script folder, not a package)
import make_checkpoints  # noqa: E402
from bench_decode import TINY  # noqa: E402  (make_checkpoints put benchmarks/ on the path)


def test_dense_and_spense_checkpoints_agree(tmp_path, tiny_model_dir):
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tokenizer / name).write_bytes((tiny_model_dir / name).read_bytes())
    cfg = TINY
    make_checkpoints.main(str(tmp_path / "out"), str(tokenizer), cfg=cfg, device="cpu")
    dense, spense = tmp_path / "out" / "dense", tmp_path / "out" / "spense"
    _, quant = read_config(spense)
    assert len(check_checkpoint_headers(spense, quant)) == 7 * cfg.layers
    dense_tensors = read_tensors(dense)
    _, _, unpacked = dense_state_dict(spense)
    for name, weight in dense_tensors.items():
        assert unpacked[name].dtype == weight.dtype == torch.bfloat16
        if name.endswith("proj.weight") and ".layers." in name:
            kept = unpacked[name] != 0
            groups = kept.view(weight.shape[0], -1, 4).sum(-1)
            assert ((groups == 2) | (groups == 4)).all(), name  # 2:4 groups and dense groups only
            assert torch.equal(unpacked[name][kept], weight[kept]), name  # kept values are the dense ones
            assert (groups == 4).float().mean() == 0.25, name  # rho = 0.25 in every matrix
        else:
            assert torch.equal(unpacked[name], weight), name
    assert (dense / "tokenizer.json").is_file() and (spense / "config.json").is_file()
    fp8 = tmp_path / "out" / "spense_fp8"  # the same pruned weights, FP8 values
    _, fp8_quant = read_config(fp8)
    assert fp8_quant.weight_dtype == "float8_e4m3fn"
    assert len(check_checkpoint_headers(fp8, fp8_quant)) == 7 * cfg.layers
    _, _, fp8_unpacked = dense_state_dict(fp8)
    for name, weight in unpacked.items():
        if name.endswith("proj.weight") and ".layers." in name:
            assert torch.equal(fp8_unpacked[name] != 0, (weight != 0) & (fp8_unpacked[name] != 0)), name
            error = (fp8_unpacked[name].float() - weight.float()).norm() / weight.float().norm()
            assert 0 < error < 0.05, name  # FP8 rounding: about 2^-5 relative


def test_serving_benchmark_passes_vllms_own_quantization_only_when_asked():
    """``folder:method`` serves the folder with vLLM's ``--quantization method`` (the dense FP8 baseline), filed
    under its own name; a plain folder gets no flag (vLLM reads a Spense checkpoint's method from its config)."""
    folder, method, env, name = bench_serving.model_spec("/tmp/vm/dense:fp8")
    assert (folder, method, env, name) == ("/tmp/vm/dense", "fp8", {}, "dense_fp8")
    command = bench_serving.server_command(folder, 8123, 32, method)
    assert command[command.index("--quantization") + 1] == "fp8"
    assert command[command.index("--model") + 1] == "/tmp/vm/dense"
    folder, method, env, name = bench_serving.model_spec("/tmp/vm/spense")
    assert (method, env, name) == (None, {}, "spense")
    assert "--quantization" not in bench_serving.server_command(folder, 8123, 32, method)


def test_serving_benchmark_takes_an_environment_per_model_and_files_repeats_apart():
    """``folder@VAR=VALUE,...`` gives that server extra environment (an A/B of a switch in one call); a spec
    measured again is filed as ``name#2`` (servers of the same code measured 10-20% apart at batch 128)."""
    folder, method, env, name = bench_serving.model_spec("/tmp/vm/spense@SPENSE_OVERLAP_REGIONS=1,A=b=c")
    assert (folder, method, env) == ("/tmp/vm/spense", None, {"SPENSE_OVERLAP_REGIONS": "1", "A": "b=c"})
    assert name == "spense@SPENSE_OVERLAP_REGIONS=1,A=b=c"
    assert bench_serving.model_spec("/tmp/vm/dense:fp8@X=1")[1:] == ("fp8", {"X": "1"}, "dense_fp8@X=1")
    with pytest.raises(ValueError, match="VAR=VALUE.*'NOVALUE'"):
        bench_serving.model_spec("/tmp/vm/spense@NOVALUE")
    taken = {}
    for spec in ("spense", "spense@X=1", "spense", "spense"):
        taken[bench_serving.unique_name(bench_serving.model_spec(spec)[3], taken)] = {}
    assert list(taken) == ["spense", "spense@X=1", "spense#2", "spense#3"]


def test_serving_benchmark_times_decode_over_the_window_where_every_request_decodes():
    """Requests that start decoding at random times and stream at their own steady rates: over the window in
    which all of them decode, the batch's rate is the sum of theirs; the per-request figure is the batch size
    times the median request's rate; requests that never decode together have no such window."""
    generator = torch.Generator().manual_seed(torch.seed() % 2**31)
    batch = 37
    firsts = torch.rand(batch, generator=generator, dtype=torch.float64).tolist()
    intervals = (0.01 + 0.02 * torch.rand(batch, generator=generator, dtype=torch.float64)).tolist()
    counts = torch.randint(400, 500, (batch,), generator=generator).tolist()
    runs = [bench_serving.Stream(first - 0.5, [first + i * dt for i in range(n)], n)
            for first, dt, n in zip(firsts, intervals, counts)]
    expected = sum(1 / dt for dt in intervals)
    steady = bench_serving.steady_decode_rate(runs)
    assert abs(steady - expected) / expected < 0.02, (steady, expected)
    median_rate = sorted(1 / dt for dt in intervals)[batch // 2]
    assert bench_serving.per_request_rate(runs) == pytest.approx(batch * median_rate, rel=1e-9)
    apart = [bench_serving.Stream(0.0, [1.0, 1.1, 1.2], 3), bench_serving.Stream(0.0, [2.0, 2.1, 2.2], 3)]
    assert bench_serving.steady_decode_rate(apart) is None
    assert bench_serving.steady_decode_rate([bench_serving.Stream(0.0, [1.0], 1)]) is None
