"""Calls another openai instrumentation traces too: one LLM span, no metric twice.

The official ``opentelemetry-instrumentation-openai-v2``, its successor
``opentelemetry-instrumentation-genai-openai`` and OpenLLMetry's
``opentelemetry-instrumentation-openai`` patch the resource methods
(``Completions.create``, ...). Those call the client's ``request``, which is where we
patch: for a call they trace, their span is already current when ours would start, and
they record their own ``gen_ai.client.*`` histograms.

So for such a call we start no span: the other's span is the call's one LLM span and
carries our attributes (``tokenlay.*`` always; the GenAI ones only where theirs has none
yet, as for a usage chunk only we saw). Of the ``gen_ai.client.*`` histograms we record
only those the other leaves out; the ``tokenlay.*`` counters are ours alone and always
recorded. Their span cannot be suppressed instead: it starts before our code runs.

``OTHERS`` says which calls each instrumentation traces and what it records; the tests
in ``tests/test_coexistence.py`` hold it to the installed releases.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind

from ._conventions import ROUTED
from ._endpoints import Endpoint
from ._metrics import DURATION_METRIC, FIRST_CHUNK_METRIC, USAGE_METRIC
from ._wire import usage_option_on

__all__ = ["OTHERS", "Other", "Shared", "shared_call", "their_share"]

_OURS = "tokenlay."
#: The scope util-genai gives spans when the instrumentation using it names none.
_UTIL_GENAI = "opentelemetry.util.genai.handler"
_WITH_TTFC = frozenset({DURATION_METRIC, USAGE_METRIC, FIRST_CHUNK_METRIC})
_NO_TTFC = frozenset({DURATION_METRIC, USAGE_METRIC})


@dataclass(frozen=True, slots=True)
class Other:
    """Another openai instrumentation, as far as sharing a call with it goes."""

    #: Module and class of its ``BaseInstrumentor``: is it instrumenting now?
    module: str
    instrumentor: str
    #: Instrumentation scopes its LLM spans carry.
    scopes: frozenset[str]
    #: Endpoint family (see :func:`family`) -> the ``gen_ai.client.*`` histograms it
    #: records for such a call. Only families whose span is current during the request.
    records: Mapping[str, frozenset[str]]


OTHERS: tuple[Other, ...] = (
    Other(  # opentelemetry-instrumentation-genai-openai (util-genai based)
        "opentelemetry.instrumentation.genai.openai",
        "OpenAIInstrumentor",
        frozenset({"opentelemetry.instrumentation.genai.openai", _UTIL_GENAI}),
        {"chat_completions": _WITH_TTFC, "responses": _WITH_TTFC, "embeddings": _NO_TTFC},
    ),
    Other(  # opentelemetry-instrumentation-openai-v2: chat through util-genai from 2.4
        "opentelemetry.instrumentation.openai_v2",
        "OpenAIInstrumentor",
        frozenset({"opentelemetry.instrumentation.openai_v2", _UTIL_GENAI}),
        {"chat_completions": _NO_TTFC, "embeddings": _NO_TTFC},
    ),
    Other(  # OpenLLMetry's opentelemetry-instrumentation-openai. Its Responses span
        # starts after the call returns, so there is nothing to share: not listed.
        "opentelemetry.instrumentation.openai.v1",
        "OpenAIV1Instrumentor",
        frozenset({"opentelemetry.instrumentation.openai.v1"}),
        {"chat_completions": _NO_TTFC, "embeddings": _NO_TTFC, "text_completion": frozenset()},
    ),
)

_BY_FAMILY: dict[str, tuple[Other, ...]] = {}
for _other in OTHERS:
    for _family in _other.records:
        _BY_FAMILY[_family] = (*_BY_FAMILY.get(_family, ()), _other)


class Shared(NamedTuple):
    """How a call traced by another instrumentation as well is recorded."""

    #: Their span, to carry our attributes; ``None`` when it records nothing (not
    #: sampled): we then start ours as usual, which the sampler treats alike.
    span: Span | None
    #: The ``gen_ai.client.*`` histograms they record for this call.
    recorded: frozenset[str]


def family(endpoint: Endpoint) -> str:
    """``chat_completions``, ``responses``, ``text_completion`` or ``embeddings``."""
    return endpoint.api_type or endpoint.operation


def shared_call(endpoint: Endpoint, body: Mapping[str, Any]) -> Shared | None:
    """How to record a call another active instrumentation traces; ``None`` if none does.

    Cheap when no other instrumentation is imported (the common case): a dict lookup
    and a ``sys.modules`` lookup or two.
    """
    name = family(endpoint)
    others = [other for other in _BY_FAMILY.get(name, ()) if _instrumenting(other)]
    if not others:
        return None
    current = trace.get_current_span()
    span: Span | None = None
    if current.is_recording():
        scope = getattr(getattr(current, "instrumentation_scope", None), "name", None)
        others = [other for other in others if scope in other.scopes]
        if not others or getattr(current, "kind", None) is not SpanKind.CLIENT or _taken(current):
            return None  # a span of someone else: this call did not pass through theirs
        span = current
    # Else not sampled: their span is there but says nothing about itself. They are
    # active and trace this kind of call, so they record its metrics all the same.
    recorded = frozenset().union(*(other.records[name] for other in others))
    if not _usage_reaches_them(endpoint, body):
        # We ask for a stream's usage chunk and strip it before anyone above us sees it:
        # they cannot have counted tokens from it.
        recorded = recorded - {USAGE_METRIC}
    return Shared(span, recorded)


def their_share(span: Span, attributes: Mapping[str, Any]) -> dict[str, Any]:
    """What of ``attributes`` goes on another instrumentation's span: ours always, the
    rest only where theirs has no value yet (they may still set theirs later)."""
    theirs = getattr(span, "attributes", None) or {}
    return {k: v for k, v in attributes.items() if k.startswith(_OURS) or k not in theirs}


def _taken(span: Span) -> bool:
    """Whether an earlier request already put our attributes on ``span``."""
    attributes = getattr(span, "attributes", None)
    return attributes is not None and ROUTED in attributes


def _usage_reaches_them(endpoint: Endpoint, body: Mapping[str, Any]) -> bool:
    if body.get("stream") is not True or not endpoint.stream_usage_option:
        return True  # a whole answer, or a stream whose usage arrives in its last event
    return usage_option_on(body)


def _instrumenting(other: Other) -> bool:
    """Whether ``other`` is instrumenting now, read off its instrumentor singleton.

    ``BaseInstrumentor`` keeps one instance per class in ``_instance``. Calling the class
    would hand back that instance too, but it re-runs ``__init__`` (OpenLLMetry's resets
    its settings there), so the attribute is read directly; tests compare both ways.
    """
    module = sys.modules.get(other.module)
    if module is None:
        return False  # never imported, so never instrumented
    instance = getattr(getattr(module, other.instrumentor, None), "_instance", None)
    return getattr(instance, "is_instrumented_by_opentelemetry", False) is True
