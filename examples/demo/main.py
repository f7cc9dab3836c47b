"""The offline demo: the local Tokenlay proxy, attributed calls, spend by org and user.

Starts the proxy on 127.0.0.1 with its mock upstream and ``rules.yaml``, sends calls for
three orgs (one user gets blocked, one downgraded, one warned), prints each LLM span as
it ends, records every call in the spend ledger, and ends with the spend tables.
No keys, no network, no Docker.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

import openai
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor

from tokenlay_otel import TokenlayOpenAI, configure, get_tokenlay_metadata, metadata
from tokenlay_otel.cli import main as tokenlay_cli
from tokenlay_otel.proxy import SQLiteStore
from tokenlay_otel.proxy.local import local_proxy

HERE = Path(__file__).parent
PROXY_KEY = "tl-demo-key"
QUESTION = [{"role": "user", "content": "In one sentence: why track LLM spend per user?"}]


def one_line(span: ReadableSpan) -> str:
    a = span.attributes or {}
    if "gen_ai.operation.name" not in a:
        return ""
    cost = a.get("tokenlay.cost.usd")
    parts = [
        f"  span  {span.name:<24}",
        f"org={a.get('tokenlay.org')} user={a.get('tokenlay.user')}",
        f"action={a.get('tokenlay.rule.action', 'none')}",
        f"tokens={a.get('gen_ai.usage.input_tokens', '-')}"
        f"/{a.get('gen_ai.usage.output_tokens', '-')}",
        f"cost=${cost:.6f}" if isinstance(cost, float) else "cost=-",
    ]
    if a.get("tokenlay.model_shifted"):
        parts.append(f"model_shifted->{a.get('gen_ai.response.model')}")
    if "error.type" in a:
        parts.append(f"error={a['error.type']}")
    return "  ".join(parts) + f"  trace={span.context.trace_id:032x}\n"


def call(client: TokenlayOpenAI, label: str, **kwargs: object) -> None:
    try:
        # max_tokens bounds what the proxy reserves against token and spend limits.
        reply = client.chat.completions.create(
            model="gpt-4o", messages=QUESTION, max_tokens=40, **kwargs
        )  # type: ignore[call-overload]
    except openai.RateLimitError as err:
        meta = get_tokenlay_metadata(err)
        print(f"{label:<34} BLOCKED 429 by {meta.rule_id if meta else '?'}: {err.body['message']}")  # type: ignore[index]
        return
    meta = get_tokenlay_metadata(reply)
    note = ""
    if meta and meta.model:
        note = f"  (proxy switched model to {meta.model})"
    if meta and meta.warnings:
        note += f"  warning: {meta.warnings[-1]}"
    print(f"{label:<34} ok, model={reply.model}{note}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--ledger",
        type=Path,
        help="keep the spend ledger in this file, to explore with tokenlay-otel spend "
        "(default: a temporary folder, removed at the end)",
    )
    args = parser.parse_args(argv)
    with ExitStack() as stack:
        return run(stack, args.ledger)


def run(stack: ExitStack, kept_ledger: Path | None) -> int:
    # Entered first, so removed last: after the proxy and the ledger closed their files.
    workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tokenlay-demo-")))
    # scripts/demo runs from the repository: a relative --ledger is the caller's.
    caller = Path(os.environ.get("TOKENLAY_DEMO_CALLER_DIR", "."))
    ledger = (caller / kept_ledger).resolve() if kept_ledger else workdir / "tokenlay-ledger.db"
    os.environ["TOKENLAY_LEDGER_PATH"] = str(ledger)
    proxy = stack.enter_context(
        local_proxy(
            rules=HERE / "rules.yaml", keys=[PROXY_KEY], store=SQLiteStore(workdir / "u.db")
        )
    )
    print(f"local Tokenlay proxy (mock upstream, rules.yaml): {proxy}")
    print(f"spend ledger: {ledger}\n")

    done = configure(service_name="tokenlay-demo", traces="tokenlay_ledger", metrics="none")
    if isinstance(done.tracer_provider, TracerProvider):
        done.tracer_provider.add_span_processor(
            SimpleSpanProcessor(ConsoleSpanExporter(formatter=one_line))
        )

    client = TokenlayOpenAI(
        provider_api_key="sk-demo-provider-key",
        tokenlay_key=PROXY_KEY,
        tokenlay_base_url=proxy,
        max_retries=0,
    )
    print("acme / bob (free plan, 3 requests a day):")
    with metadata(org="acme", user="bob", plan="free", feature="chat"):
        for i in range(4):
            call(client, f"  bob call {i + 1}")
    print("\nacme / alice (pro plan, monthly spend cap, then a cheaper model):")
    with metadata(org="acme", user="alice", plan="pro", feature="summaries"):
        for i in range(5):
            call(client, f"  alice call {i + 1}")
    print("\nglobex / carol and dan (team plan, shared daily token budget):")
    for i in range(8):
        user = "carol" if i % 2 == 0 else "dan"
        with metadata(org="globex", user=user, plan="team", feature="support"):
            call(client, f"  {user} call {i // 2 + 1}")
    print("\ninitech / erin (no rule applies), streamed:")
    with metadata(org="initech", user="erin", plan="enterprise"):
        stream = client.chat.completions.create(model="gpt-4o-mini", messages=QUESTION, stream=True)  # type: ignore[arg-type]
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        print(f"  erin stream                       {text!r}")

    done.shutdown()  # flushes the ledger
    print("\nspend by org (tokenlay-otel spend --by org):")
    tokenlay_cli(["spend", "--db", str(ledger), "--by", "org", "--since", "1h"])
    print("\nspend by user (tokenlay-otel spend --by user):")
    tokenlay_cli(["spend", "--db", str(ledger), "--by", "user", "--since", "1h"])
    # The command as it can be typed: the venv's, unless the venv is the shell's.
    command = Path(sys.executable).parent / "tokenlay-otel"
    shown = command if os.environ.get("VIRTUAL_ENV") != str(Path(sys.prefix)) else command.name
    if kept_ledger:
        print(f"\nTry: {shown} spend --db {ledger} --by model --format json")
    else:
        print("\nTo keep the ledger and explore it: ./scripts/demo --ledger spend.db, then")
        print(f"{shown} spend --db spend.db --by model --format json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
