"""benchmarks/bench_decode.py on the CPU: its Spense decoder against fp64 math on the unpacked weights, and
an end-to-end run of the script on the tiny model."""

from __future__ import annotations

import copy
import json
import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_decode  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)

CPU = torch.device("cpu")
CONTEXT = 24


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls gain nothing from threads, and their synchronisation stalls on a busy CI machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("rho, fp8", [(0.0, False), (0.125, False), (0.25, False), (0.25, True)])
@pytest.mark.parametrize("batch, tokens", [(3, 1), (20, 1), (1, 19)])  # decode: gather and unpack paths; prefill
def test_spense_decoder_matches_fp64_on_unpacked_weights(rho, fp8, batch, tokens, generator):
    cfg = bench_decode.TINY
    model = bench_decode.build_model(cfg, rho, CPU, torch.float32, CONTEXT + 1, seed=int(generator.initial_seed()),
                                     fp8=fp8)
    start = 0 if tokens > 1 else CONTEXT
    cache = bench_decode.make_cache(cfg, batch, start + tokens, CPU, torch.float32, generator)
    ids = torch.randint(cfg.vocab, (batch, tokens), generator=generator)

    reference = copy.deepcopy(model).double()  # the same packed tensors, multiplied as unpack's dense W in fp64
    bench_decode.set_check_mode(reference, reference=True)
    expected = reference(ids, start, [(k.double(), v.double()) for k, v in cache])
    logits = model(ids, start, cache)

    assert logits.shape == (batch, cfg.vocab)
    assert expected.std(dim=-1).min() > 0.1  # non-trivial logits
    assert bench_decode.rel_err(logits, expected) < 1e-5
    dense = bench_decode.build_model(cfg, None, CPU, torch.float32, CONTEXT + 1, seed=int(generator.initial_seed()))
    assert bench_decode.rel_err(dense(ids, start, cache), expected) > 1e-2  # the pruning changed the model


def test_dense_fp8_baseline_is_scaled_mm_on_per_token_fp8(generator):
    """DenseFP8Linear against fp64 math: W and x each rounded to FP8 on their own rows' scales."""
    weight = torch.randn(48, 256, generator=generator) / 16
    x = torch.randn(2, 5, 256, generator=generator) * torch.rand(2, 5, 1, generator=generator)
    linear = bench_decode.DenseFP8Linear(weight)
    w_ref = bench_decode.fp8_values(weight, bench_decode.fp8_scales(weight)).double() * linear.weight_scale.double()[:, None]
    x2 = x.reshape(-1, 256)
    x_ref = bench_decode.fp8_values(x2, bench_decode.fp8_scales(x2)).double() * bench_decode.fp8_scales(x2).double()[:, None]
    expected = (x_ref @ w_ref.t()).reshape(2, 5, 48)
    assert bench_decode.rel_err(linear(x), expected) < 1e-5
    assert bench_decode.rel_err(linear(x), x.double() @ weight.double().t()) > 1e-3  # FP8 rounding is in it


def test_guard_stops_the_run_on_a_wrong_kernel(monkeypatch):
    model = bench_decode.build_model(bench_decode.TINY, 0.25, CPU, torch.float32, CONTEXT + 1)
    good = bench_decode.check_step(model, 2, CONTEXT, seed=1)
    assert good["worst_linear"] < 1e-5 and good["logits"] < 1e-5
    apply = bench_decode.linear_kernel.apply
    # A kernel that reads its input one 4-channel group off, as a wrong channel map would.
    monkeypatch.setattr(bench_decode.linear_kernel, "apply", lambda layer, x: apply(layer, x.roll(4, dims=-1)))
    assert bench_decode.check_step(model, 2, CONTEXT, seed=1)["worst_linear"] > 0.1
    with pytest.raises(RuntimeError, match="rho=0.25: Spense outputs differ"):
        bench_decode.main(["--device", "cpu", "--tiny", "--variants", "rho=0.25", "--context", str(CONTEXT)])


def test_script_runs_and_writes_every_figure(tmp_path):
    out = tmp_path / "bench_decode.json"
    assert bench_decode.main(["--device", "cpu", "--tiny", "--variants", "dense", "rho=0.25", "dense fp8",
                              "fp8 rho=0.25", "--batches", "1", "3",
                              "--context", "16", "--prefill", "32", "--budget", "0.01", "--repeats", "2",
                              "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {"device", "torch", "triton", "dtype", "config", "variants", "wall_s"} <= set(data)
    assert data["config"]["layers"] == 2 and data["config"]["hidden"] == 256
    assert list(data["variants"]) == ["dense", "rho=0.25", "dense fp8", "fp8 rho=0.25"]
    spense = data["variants"]["rho=0.25"]
    bytes_of = {name: result["linear_bytes"] for name, result in data["variants"].items()}
    assert bytes_of["fp8 rho=0.25"] < bytes_of["dense fp8"] < bytes_of["rho=0.25"] < bytes_of["dense"]
    assert data["variants"]["fp8 rho=0.25"]["check_rel_err"]["2"]["logits"] < 1e-4
    assert data["variants"]["fp8 rho=0.25"]["decode"]["3"]["speedup_fp8"] > 0
    assert "speedup_fp8" not in spense["decode"]["3"]
    assert spense["check_rel_err"]["2"]["logits"] < 1e-4
    for result in data["variants"].values():
        for batch in ("1", "3"):
            entry = result["decode"][batch]
            assert {"step_ms", "tokens_per_s", "linear_ms", "gemm_share", "speedup"} <= set(entry)
            assert entry["tokens_per_s"] == pytest.approx(int(batch) / entry["step_ms"] * 1e3)
        assert {"ms", "tokens_per_s", "speedup"} <= set(result["prefill"]["32"])
    assert data["variants"]["dense"]["decode"]["1"]["speedup"] == 1.0

    import report_decode

    text = report_decode.tables(data)
    assert "| rho=0.25 |" in text and "prefill 32" in text and "x vs dense fp8" in text
    pytest.importorskip("matplotlib")
    png = tmp_path / "decode.png"
    report_decode.plot(data, str(png))
    assert png.stat().st_size > 1000


def test_decode_only_run_without_prefill_sizes(tmp_path):
    """``--prefill`` with no sizes (decode figures only, as run on the GPU) used to fail sizing the RoPE tables."""
    out = tmp_path / "decode_only.json"
    assert bench_decode.main(["--device", "cpu", "--tiny", "--variants", "dense", "rho=0.25", "--batches", "2",
                              "--context", "16", "--prefill", "--budget", "0.01", "--repeats", "1",
                              "--json", str(out)]) == 0
    variants = json.loads(out.read_text())["variants"]
    assert variants["rho=0.25"]["decode"]["2"]["tokens_per_s"] > 0 and not variants["rho=0.25"].get("prefill")


def test_weight_bytes_count_a_shared_storage_once(generator):
    """Where the 2:4 region went to cuSPARSELt, ``sparse_weight`` is a view into ``sparse_compressed``: the
    memory figure must count those bytes once, and still count tensors that only look alike."""
    rows, cols = 7, int(torch.randint(5, 40, (1,), generator=generator))
    compressed = torch.randn(rows * cols + 13, generator=generator)
    values = compressed[:rows * cols].view(rows, cols)
    separate = torch.randn(rows, cols, generator=generator)
    assert bench_decode.tensor_bytes([compressed, values]) == compressed.numel() * 4
    assert bench_decode.tensor_bytes([compressed, values, separate]) == (compressed.numel() + separate.numel()) * 4
