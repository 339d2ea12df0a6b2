"""Load on the CPU OpenAI server (loopback only): 32 concurrent clients x 8 requests each, mixing
completions, chat, streaming, cancelled streams, max_tokens 1 and 64. Zero failures, every greedy answer
identical to the same request answered alone, and the server healthy afterwards."""

from __future__ import annotations

import asyncio
import json
import urllib.request

import pytest

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

from vllm_spense.local_server import VllmServer  # noqa: E402

CLIENTS, REQUESTS = 32, 8
PROMPTS = ["To be, or not to be", "My lord, the king", "Now is the winter", "What light through yonder"]
KINDS = ["completion 64", "chat 64", "stream 64", "cancelled stream", "completion 1"]
EXTRA = {"ignore_eos": True, "return_token_ids": True}


async def answer(client, kind: str, prompt: str):
    """What the request returns that must not depend on the load: token ids, or streamed text."""
    max_tokens = 1 if kind.endswith(" 1") else 64
    if kind.startswith("completion"):
        reply = await client.completions.create(model="spense", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                                extra_body=EXTRA)
        return reply.choices[0].model_dump()["token_ids"]
    if kind.startswith("chat"):
        reply = await client.chat.completions.create(model="spense", messages=[{"role": "user", "content": prompt}],
                                                     max_tokens=max_tokens, temperature=0, extra_body=EXTRA)
        return reply.choices[0].model_dump()["token_ids"]
    stream = await client.completions.create(model="spense", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                             stream=True, extra_body={"ignore_eos": True})
    if kind == "cancelled stream":
        async for _ in stream:
            break  # read one chunk, then hang up
        await stream.close()
        return None
    return "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])


async def client_session(url: str, index: int, results: list) -> None:
    async with openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=300) as client:
        for request in range(REQUESTS):
            kind, prompt = KINDS[(index + request) % len(KINDS)], PROMPTS[(index * REQUESTS + request) % len(PROMPTS)]
            results.append((kind, prompt, await answer(client, kind, prompt)))


async def alone_answers(url: str) -> dict:
    async with openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=300) as client:
        return {(kind, prompt): await answer(client, kind, prompt)
                for kind in KINDS if kind != "cancelled stream" for prompt in PROMPTS}


def test_32_clients_x_8_requests(tiny_checkpoint, tmp_path):
    server = VllmServer(tiny_checkpoint, log=tmp_path / "load.log")
    with server:
        url = server.url + "/v1"
        alone = asyncio.run(alone_answers(url))
        results: list = []

        async def load():
            await asyncio.wait_for(asyncio.gather(*(client_session(url, i, results) for i in range(CLIENTS))), 900)

        asyncio.run(load())  # any failed request raises here
        assert len(results) == CLIENTS * REQUESTS
        for kind, prompt, got in results:
            if kind != "cancelled stream":
                assert got == alone[kind, prompt], (kind, prompt)
        assert server.healthy()
        with urllib.request.urlopen(server.url + "/metrics", timeout=10) as response:
            metrics = response.read().decode()
        assert asyncio.run(alone_answers(url)) == alone  # still serving, still the same answers
    summary = {kind: sum(1 for k, _, _ in results if k == kind) for kind in KINDS}
    print(json.dumps({"requests": len(results), **summary}))
    assert "vllm:request_success_total" in metrics
