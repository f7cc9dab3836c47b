"""Streaming: the caller sees exactly the chunks it asked for; usage and cost still come in.

The SDK asks for `stream_options.include_usage` on the caller's behalf and hides that
extra usage chunk; the span ends when the stream does (or is closed, or abandoned),
with time to first chunk, tokens and the proxy's cost.
"""

from __future__ import annotations

import sys

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tokenlay_otel import TokenlayInstrumentor, TokenlayOpenAI, get_tokenlay_metadata, metadata
from tokenlay_otel.proxy.local import tokenlay_or_local


def main() -> int:
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    TokenlayInstrumentor().instrument(tracer_provider=provider)
    with tokenlay_or_local() as endpoint:
        client = TokenlayOpenAI(**endpoint)
        with metadata(user="streamer", org="acme"):
            print("1. a stream read to the end:")
            stream = client.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": "Tell me something short."}],
                stream=True,
            )
            with stream:
                for chunk in stream:
                    print(chunk.choices[0].delta.content or "", end="", flush=True)
            print()
            print("   tokenlay:", get_tokenlay_metadata(stream))

            # On purpose: read one chunk, then leave. Leaving the `with` closes the
            # stream, which ends its span at once; the final usage chunk never comes,
            # so that span has no tokens or cost (source "unknown"). The local proxy
            # still charges the call: it reads on upstream for the usage, or estimates it.
            with client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "Again"}], stream=True
            ) as early:
                first = next(iter(early))
            print(
                "2. a stream left on purpose after its first chunk "
                f"({first.choices[0].delta.content!r}): closed, so its span ends now"
            )
    labels = ("read to the end", "left after one chunk")
    for label, span in zip(labels, spans.get_finished_spans(), strict=True):
        a = span.attributes or {}
        cost = a.get("tokenlay.cost.usd")
        print(
            f"span {span.name} ({label}): "
            f"ttfc={a.get('gen_ai.response.time_to_first_chunk', 0):.4f}s "
            f"tokens={a.get('gen_ai.usage.input_tokens', '-')}"
            f"/{a.get('gen_ai.usage.output_tokens', '-')} "
            f"cost={f'${cost:.6g}' if isinstance(cost, float) else '-'} "
            f"(source: {a.get('tokenlay.cost.source')})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
