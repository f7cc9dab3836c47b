"""A Flask app that attributes each request's LLM calls to its user and org.

`before_request`/`teardown_request` enter and leave a `metadata(...)` scope; running
this file serves three requests through Flask's test client against the local proxy;
each answer shows the attribution its call sent and what the proxy said about it.
"""

from __future__ import annotations

import sys
from typing import Any

from flask import Flask, g, jsonify, request

from tokenlay_otel import TokenlayOpenAI, get_tokenlay_metadata, metadata
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


def create_app(client: TokenlayOpenAI) -> Flask:
    app = Flask(__name__)

    @app.before_request
    def attribute() -> None:
        g.tokenlay_scope = metadata(
            user=request.headers.get("X-User-Id"), org=request.headers.get("X-Org-Id")
        )
        g.tokenlay_scope.__enter__()

    @app.teardown_request
    def end_attribution(exc: BaseException | None) -> None:
        scope = g.pop("tokenlay_scope", None)
        if scope is not None:
            scope.__exit__(None, None, None)

    @app.post("/ask")
    def ask():  # type: ignore[no-untyped-def]
        # with_raw_response: the parsed reply, and the request as it went out.
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": request.json["q"]}]
        )
        meta = get_tokenlay_metadata(raw)
        return jsonify(
            answer=raw.parse().choices[0].message.content,
            attribution=attribution_sent(raw),
            rule_action=meta.rule_action if meta else None,
            cost_usd=meta.cost if meta else None,
        )

    return app


def main() -> int:
    with tokenlay_or_local() as endpoint:
        app = create_app(TokenlayOpenAI(**endpoint))
        http = app.test_client()
        for user, org in [("dave", "initech"), ("erin", "initech"), ("frank", "hooli")]:
            r = http.post(
                "/ask", json={"q": "Hello?"}, headers={"X-User-Id": user, "X-Org-Id": org}
            )
            assert r.status_code == 200, r.data
            print(f"{user}@{org}: {r.get_json()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
