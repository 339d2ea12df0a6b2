"""Serve a Spense checkpoint with vLLM's OpenAI-compatible server and ask it a question.

    python scripts/serve_and_ask.py runs/smollm2-135m-spense-0.25 --question "Who wrote Hamlet?"

The server runs as a child process (CPU flags: vllm_spense/local_server.py) and stops when the answer is in.
"""

from __future__ import annotations

import argparse
import pathlib

from vllm_spense.local_server import VllmServer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=pathlib.Path)
    parser.add_argument("--question", default="What is the capital of France?")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    log = args.checkpoint.parent / f"{args.checkpoint.name}.serve.log"
    print(f"starting vLLM on {args.checkpoint} with --quantization spense (log: {log})", flush=True)
    with VllmServer(args.checkpoint, "--quantization", "spense", log=log) as client:
        reply = client.chat.completions.create(model="spense", temperature=0, max_tokens=args.max_tokens,
                                               messages=[{"role": "user", "content": args.question}])
    print(f"Q: {args.question}\nA: {reply.choices[0].message.content.strip()}")


if __name__ == "__main__":
    main()
