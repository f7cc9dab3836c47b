"""A FastAPI app whose middleware attributes every LLM call to the request's user and org.

The middleware reads `X-User-Id` / `X-Org-Id` (in a real app: from your auth) and
wraps the request in `metadata(...)`; every openai call made while handling it is
attributed, on the wire to Tokenlay and on spans and metrics. Running this file serves
three requests through FastAPI's test client against the local proxy (offline); each
answer shows the attribution its call sent and what the proxy said about it.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.testclient import TestClient

from tokenlay_otel import AsyncTokenlayOpenAI, get_tokenlay_metadata, metadata
from tokenlay_otel.proxy.local import tokenlay_or_local

#: x-tokenlay-* headers that are not attribution: the provider's key and base URL.
NOT_ATTRIBUTION = frozenset({"x-tokenlay-provider-key", "x-tokenlay-provider-base"})


def attribution_sent(raw: Any) -> dict[str, str]:
    """The attribution a call carried to Tokenlay, read from the request as it was sent
    (the provider's key is left out: never echo it)."""
    return {
        name.removeprefix("x-tokenlay-"): value
        for name, value in raw.http_request.headers.items()
        if name.startswith("x-tokenlay-") and name not in NOT_ATTRIBUTION
    }


def create_app(client: AsyncTokenlayOpenAI) -> FastAPI:
    app = FastAPI()

    @app.middleware("http")
    async def attribute(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        user = request.headers.get("x-user-id")
        org = request.headers.get("x-org-id")
        with metadata(user=user, org=org, feature="ask"):
            return await call_next(request)

    @app.post("/ask")
    async def ask(question: dict[str, str]) -> dict[str, object]:
        # with_raw_response: the parsed reply, and the request as it went out.
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": question["q"]}]
        )
        reply = raw.parse()
        meta = get_tokenlay_metadata(raw)
        return {
            "answer": reply.choices[0].message.content,
            "attribution": attribution_sent(raw),
            "rule_action": meta.rule_action if meta else None,
            "cost_usd": meta.cost if meta else None,
        }

    return app


def main() -> int:
    with tokenlay_or_local() as endpoint:
        app = create_app(AsyncTokenlayOpenAI(**endpoint))
        with TestClient(app) as http:
            for user, org in [("alice", "acme"), ("bob", "acme"), ("carol", "globex")]:
                r = http.post("/ask", json={"q": "What is 2+2?"},
                              headers={"x-user-id": user, "x-org-id": org})  # fmt: skip
                r.raise_for_status()
                print(f"{user}@{org}: {r.json()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
