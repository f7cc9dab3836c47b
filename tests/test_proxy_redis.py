"""Two proxy processes on one Redis enforce one shared limit exactly."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

from tokenlay_otel import TokenlayOpenAI

from .conftest import PROVIDER_KEY
from .proxy_harness import PROXY_KEY, proxy_process, redis_server

LIMIT = 25


def test_two_proxies_share_one_limit_exactly(tmp_path: Path) -> None:
    rules = tmp_path / "rules.json"
    rules.write_text(
        json.dumps(
            [
                {
                    "id": "shared",
                    "if": {"org": "acme"},
                    "then": {
                        "limits": [
                            {"type": "requests", "max": LIMIT, "window": "hour", "per": "org"}
                        ]
                    },
                }
            ]
        )
    )
    with redis_server(tmp_path) as redis_url:
        common = ("--mock-upstream", "--rules", str(rules), "--redis-url", redis_url)
        with proxy_process(*common) as a, proxy_process(*common) as b:
            clients = [
                TokenlayOpenAI(
                    provider_api_key=PROVIDER_KEY,
                    tokenlay_key=PROXY_KEY,
                    tokenlay_base_url=url,
                    max_retries=0,
                    metadata={"org": "acme"},
                )
                for url in (a, b)
            ]

            def call(i: int) -> int:
                try:
                    clients[i % 2].chat.completions.create(
                        model="gpt-4o-mini", messages=[{"role": "user", "content": f"q{i}"}]
                    )
                    return 200
                except openai.RateLimitError:
                    return 429

            with ThreadPoolExecutor(max_workers=16) as pool:
                statuses = list(pool.map(call, range(LIMIT * 3)))
    assert statuses.count(200) == LIMIT
    assert statuses.count(429) == 2 * LIMIT
