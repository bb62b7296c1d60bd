"""The OpenAI-compatible API with the official `openai` client (what agent frameworks use).

parrot-actors serve --port 9000 &
python examples/openai_chat.py --url http://127.0.0.1:9000 ["your question"]
"""

from __future__ import annotations

import argparse

import openai


def main() -> None:
    """Ask one question twice: a whole answer, then streamed; print the usage counts."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:9000")
    parser.add_argument("question", nargs="?", default="What is a semantic variable?")
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    client = openai.OpenAI(base_url=args.url + "/v1", api_key="unused")
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": args.question}]
    reply = client.chat.completions.create(
        model=model, messages=messages, max_tokens=args.max_tokens, temperature=0
    )
    print(f"[{model}] {reply.choices[0].message.content}")
    print(f"usage: {reply.usage.prompt_tokens} prompt + {reply.usage.completion_tokens} completion")
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=args.max_tokens, temperature=0, stream=True
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()


if __name__ == "__main__":
    main()
