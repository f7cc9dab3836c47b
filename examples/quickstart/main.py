"""Quick start: the drop-in client, attribution, and what the proxy said.

With TOKENLAY_KEY and PROVIDER_API_KEY set it talks to Tokenlay; without them it starts
the local Tokenlay-compatible proxy with its mock upstream (offline, no keys).
"""

from __future__ import annotations

import sys

from tokenlay_otel import TokenlayOpenAI, get_tokenlay_metadata, metadata
from tokenlay_otel.proxy.local import tokenlay_or_local

MESSAGES = [{"role": "user", "content": "Say hello."}]


def main() -> int:
    with tokenlay_or_local() as endpoint:
        client = TokenlayOpenAI(metadata={"org": "org_456xyz", "plan": "pro"}, **endpoint)

        with metadata(user="user_abc123", feature="autocomplete"):
            reply = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        print("reply:   ", reply.choices[0].message.content)
        meta = get_tokenlay_metadata(reply)
        print("tokenlay:", meta)

        # Per-request extra_headers win over metadata() and the client's metadata.
        stream = client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True, extra_headers={"user": "user_def"}
        )
        print("stream:  ", "".join(c.choices[0].delta.content or "" for c in stream if c.choices))
        print("tokenlay:", get_tokenlay_metadata(stream))
    return 0 if meta is not None else 1


if __name__ == "__main__":
    sys.exit(main())
