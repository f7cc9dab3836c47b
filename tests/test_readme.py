"""The README's metrics tables list every metric the SDK and the proxy create, and every
attribute they were seen to carry."""

from __future__ import annotations

import ast
import contextlib
import re
from pathlib import Path

import openai
import pytest

from tokenlay_otel import TokenlayOpenAI, metadata
from tokenlay_otel.proxy.local import DEFAULT_LOCAL_KEY, local_proxy

from .conftest import SpanCapture

ROOT = Path(__file__).parent.parent
SRC = ROOT / "src" / "tokenlay_otel"
_CREATE = re.compile(r"create_(observable_)?(counter|up_down_counter|histogram|gauge)")


def metrics_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Metrics and cost")
    return text[start : text.index("\n## ", start + 1)]


def table_rows() -> dict[str, str]:
    """Metric name -> its row, from the tables of the metrics section."""
    rows = {}
    for line in metrics_section().splitlines():
        match = re.match(r"\| `([\w.]+)` \|", line)
        if match:
            rows[match.group(1)] = line
    return rows


def ticked(text: str) -> set[str]:
    return set(re.findall(r"`([^`]+)`", text))


def created_metric_names() -> set[str]:
    """The first argument of every ``meter.create_*`` call in the package (a string, or
    a module-level string constant)."""
    names = set()
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text())
        constants = {
            target.id: node.value.value
            for node in tree.body
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
            for target in node.targets
            if isinstance(target, ast.Name) and isinstance(node.value.value, str)
        }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and _CREATE.fullmatch(node.func.attr)
            ):
                first = node.args[0]
                if isinstance(first, ast.Constant):
                    names.add(first.value)
                else:
                    assert isinstance(first, ast.Name), ast.dump(first)
                    names.add(constants[first.id])
    return names


def test_every_metric_the_code_creates_has_a_row() -> None:
    created = created_metric_names()
    assert len(created) >= 11  # the parse found the instruments
    assert created - set(table_rows()) == set()


@pytest.mark.slow
def test_every_attribute_seen_is_documented(instrument, telemetry: SpanCapture) -> None:
    """A mix of calls through the local proxy (allowed, blocked, downgraded, warned,
    streamed, cached), both sides' metrics in one reader; each attribute key must be
    named in its metric's row or among the common attributes."""
    instrument()
    rules = ROOT / "examples" / "demo" / "rules.yaml"
    with local_proxy(rules=rules, meter_provider=telemetry.meter_provider) as url:
        client = TokenlayOpenAI(provider_api_key="sk-x", tokenlay_key=DEFAULT_LOCAL_KEY,
                                tokenlay_base_url=url, max_retries=0)  # fmt: skip
        calls = [("bob", "free")] * 4 + [("alice", "pro")] * 5 + [("carol", "team")] * 6
        for user, plan in calls:
            with (
                metadata(user=user, org=f"org-{plan}", plan=plan),
                contextlib.suppress(openai.RateLimitError),
            ):
                client.chat.completions.create(
                    model="gpt-4o", max_tokens=40, messages=[{"role": "user", "content": "hi"}]
                )
        with metadata(user="sam", org="org-stream"):
            list(client.chat.completions.create(
                model="gpt-4o-mini", stream=True, messages=[{"role": "user", "content": "s"}]
            ))  # fmt: skip
        seen = telemetry.metrics()  # while the proxy runs: its gauges read its store

    rows = table_rows()
    section = metrics_section()
    common = ticked(section[section.index("Common attributes") :].split("\n\n")[0])
    assert set(seen) - set(rows) == set()
    assert "tokenlay.proxy.limit.utilization" in seen  # the mix reached every kind
    assert "tokenlay.client.cached_tokens" in seen
    for name, (_, points) in seen.items():
        keys = {key for point in points for key in point.attributes}
        documented = ticked(rows[name]) | common
        assert keys - documented == set(), name


def test_the_testing_example_runs() -> None:
    """The README's "Testing your own code" example, run as the test it is."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Testing your own code") :]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code
    namespace: dict[str, object] = {}
    exec(compile(code.group(1), "README.md", "exec"), namespace)
    test = namespace["test_attribution_and_blocks"]
    assert callable(test)
    test()
