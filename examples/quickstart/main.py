"""Quick start: the drop-in client, attribution, and what the proxy said.

With TOKENLAY_KEY, PROVIDER_API_KEY (and optionally TOKENLAY_BASE_URL,
PROVIDER_API_BASE) set, it talks to the real services. Without them it runs offline
against a local stand-in for the Tokenlay proxy on 127.0.0.1 and prints every request
as it arrived on the wire (keys redacted).
"""

from __future__ import annotations

import os
import sys
from contextlib import ExitStack

import openai

from tokenlay_otel import TokenlayOpenAI, get_tokenlay_metadata, metadata
from tokenlay_otel.testing import FakeOpenAIServer, RecordedRequest, Reply

MESSAGES = [{"role": "user", "content": "Say hello."}]


def show_wire(request: RecordedRequest) -> None:
    print(f"  -> {request.method} {request.path}")
    for name, value in request.raw_headers:
        lowered = name.lower()
        if lowered == "authorization" or lowered == "x-tokenlay-provider-key":
            value = value[:7] + "…(redacted)"
        if lowered.startswith("x-tokenlay-") or lowered == "authorization":
            print(f"     {lowered}: {value}")


def main() -> int:
    offline = not os.environ.get("TOKENLAY_KEY")
    with ExitStack() as stack:
        server: FakeOpenAIServer | None = None
        if offline:
            server = stack.enter_context(
                FakeOpenAIServer(
                    response_headers={
                        "x-tokenlay-rule-id": "pro-monthly-budget",
                        "x-tokenlay-rule-action": "warn",
                        "x-tokenlay-cost": "0.0000063",
                        "x-tokenlay-warnings": '["80% of monthly budget used"]',
                    }
                )
            )
            print(f"offline: a local stand-in for the Tokenlay proxy runs at {server.url}\n")
        client = TokenlayOpenAI(
            provider_api_key=os.environ.get("PROVIDER_API_KEY", "sk-demo-provider-key"),
            provider_api_base=os.environ.get("PROVIDER_API_BASE"),
            tokenlay_key=os.environ.get("TOKENLAY_KEY", "tl-demo-key"),
            tokenlay_base_url=server.url if server else os.environ.get("TOKENLAY_BASE_URL"),
            metadata={"org": "org_456xyz", "plan": "pro"},
        )

        print("1. a call attributed to user_abc123 / feature autocomplete")
        with metadata(user="user_abc123", feature="autocomplete"):
            reply = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        if server:
            show_wire(server.requests[-1])
        print(f"  <- {reply.choices[0].message.content!r}")
        print(f"  tokenlay: {get_tokenlay_metadata(reply)}\n")

        print("2. a streamed call for another user (per-request extra_headers win)")
        stream = client.chat.completions.create(
            model="gpt-4o-mini",
            messages=MESSAGES,
            stream=True,
            extra_headers={"user": "user_def789"},
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        if server:
            show_wire(server.requests[-1])
        print(f"  <- {text!r}\n")

        if server:
            print("3. a call the proxy blocks (a free-tier limit)")
            server.reply(
                Reply(
                    status=429,
                    body={
                        "error": {
                            "message": "Daily request limit reached for the free plan",
                            "type": "tokenlay_limit",
                            "code": "limit_exceeded",
                        }
                    },
                    headers={
                        "x-tokenlay-rule-id": "free-daily-requests",
                        "x-tokenlay-rule-action": "block",
                        "x-tokenlay-limit-exceeded": "true",
                        # A block is final: tell openai's client not to retry it.
                        "x-should-retry": "false",
                    },
                )
            )
            try:
                with metadata(user="user_free001", plan="free"):
                    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
            except openai.RateLimitError as err:
                print(f"  <- openai.RateLimitError {err.status_code}: {err.message}")
                print(f"  tokenlay: {get_tokenlay_metadata(err)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
