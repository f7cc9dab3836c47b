"""Two proxy processes on one Redis enforce one shared limit exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tokenlay_otel import TokenlayOpenAI

from .conftest import PROVIDER_KEY
from .proxy_harness import PROXY_KEY, proxy_process, redis_server, statuses_of_calls

pytestmark = pytest.mark.slow  # a Redis server and two proxy processes

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

            statuses = statuses_of_calls(clients, LIMIT * 3)
    assert statuses.count(200) == LIMIT
    assert statuses.count(429) == 2 * LIMIT
