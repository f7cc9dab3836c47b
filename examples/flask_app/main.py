"""A Flask app that attributes each request's LLM calls to its user and org.

`before_request`/`teardown_request` enter and leave a `metadata(...)` scope; running
this file serves three requests through Flask's test client against the local proxy.
"""

from __future__ import annotations

import sys

from flask import Flask, g, jsonify, request

from tokenlay_otel import TokenlayOpenAI, get_tokenlay_metadata, metadata
from tokenlay_otel.proxy.local import tokenlay_or_local


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
        reply = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": request.json["q"]}]
        )
        meta = get_tokenlay_metadata(reply)
        return jsonify(
            answer=reply.choices[0].message.content, cost_usd=meta.cost if meta else None
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
