"""Telemetry names, each written once: span and metric attribute names, and the
histograms' bucket boundaries, for the SDK and the proxy alike.

Names the OpenTelemetry semantic conventions define come from
``opentelemetry-semantic-conventions`` where its oldest version we support (0.51b0,
pyproject's lower bound) has them. The GenAI and OpenAI names of released conventions
v1.37+ are spelled here, as are Tokenlay's own: the package has the first of them from
0.58b0 (``gen_ai.provider.name``, ``openai.*``, ``choice.count``) and the rest only in
later versions (0.66b2 has all); they move to its constants when the bound is raised.

Module constants: resolved once at import, so no call pays for where they come from.
"""

from __future__ import annotations

import functools

from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as _gen_ai
from opentelemetry.semconv.attributes import (
    error_attributes,
    http_attributes,
    server_attributes,
    service_attributes,
    url_attributes,
)

from ._wire import STANDARD_FIELDS

__all__ = [
    "API_TYPE",
    "BYPASSED",
    "CACHED_INPUT_TOKENS",
    "CHOICE_COUNT",
    "COST",
    "COST_SOURCE",
    "DURATION_BUCKETS",
    "ERROR_TYPE",
    "FINISH_REASONS",
    "FREQUENCY_PENALTY",
    "HTTP_REQUEST_METHOD",
    "HTTP_STATUS_CODE",
    "INPUT_MESSAGES",
    "INPUT_TOKENS",
    "LIMIT_EXCEEDED",
    "LIMIT_FIELD",
    "LIMIT_TYPE",
    "LIMIT_VALUE",
    "LIMIT_WINDOW",
    "MAX_TOKENS",
    "METADATA_PREFIX",
    "MODEL_SHIFTED",
    "OPERATION",
    "OUTPUT_MESSAGES",
    "OUTPUT_TOKENS",
    "PRESENCE_PENALTY",
    "PROVIDER",
    "PROXY_EXIT",
    "PROXY_MODEL",
    "PROXY_URL",
    "REASONING_TOKENS",
    "REQUEST_MODEL",
    "REQUEST_SERVICE_TIER",
    "RESPONSE_ID",
    "RESPONSE_MODEL",
    "RESPONSE_SERVICE_TIER",
    "ROUTED",
    "RULE_ACTION",
    "RULE_ID",
    "SEED",
    "SERVER_ADDRESS",
    "SERVER_PORT",
    "SERVICE_NAME",
    "STOP_SEQUENCES",
    "STREAM",
    "SYSTEM_FINGERPRINT",
    "TEMPERATURE",
    "TIME_TO_FIRST_CHUNK",
    "TOKEN_BUCKETS",
    "TOKEN_TYPE",
    "TOP_P",
    "URL_PATH",
    "USAGE_SOURCE",
    "WARNING_EVENT",
    "WARNING_MESSAGE",
    "metadata_attribute",
]

# --- OpenTelemetry semantic conventions, from the package ------------------------------
OPERATION = _gen_ai.GEN_AI_OPERATION_NAME
REQUEST_MODEL = _gen_ai.GEN_AI_REQUEST_MODEL
RESPONSE_MODEL = _gen_ai.GEN_AI_RESPONSE_MODEL
RESPONSE_ID = _gen_ai.GEN_AI_RESPONSE_ID
FINISH_REASONS = _gen_ai.GEN_AI_RESPONSE_FINISH_REASONS
INPUT_TOKENS = _gen_ai.GEN_AI_USAGE_INPUT_TOKENS
OUTPUT_TOKENS = _gen_ai.GEN_AI_USAGE_OUTPUT_TOKENS
TEMPERATURE = _gen_ai.GEN_AI_REQUEST_TEMPERATURE
TOP_P = _gen_ai.GEN_AI_REQUEST_TOP_P
FREQUENCY_PENALTY = _gen_ai.GEN_AI_REQUEST_FREQUENCY_PENALTY
PRESENCE_PENALTY = _gen_ai.GEN_AI_REQUEST_PRESENCE_PENALTY
SEED = _gen_ai.GEN_AI_REQUEST_SEED
MAX_TOKENS = _gen_ai.GEN_AI_REQUEST_MAX_TOKENS
STOP_SEQUENCES = _gen_ai.GEN_AI_REQUEST_STOP_SEQUENCES
#: ``input`` or ``output``, on ``gen_ai.client.token.usage`` points.
TOKEN_TYPE = _gen_ai.GEN_AI_TOKEN_TYPE
SERVER_ADDRESS = server_attributes.SERVER_ADDRESS
SERVER_PORT = server_attributes.SERVER_PORT
ERROR_TYPE = error_attributes.ERROR_TYPE
HTTP_REQUEST_METHOD = http_attributes.HTTP_REQUEST_METHOD
HTTP_STATUS_CODE = http_attributes.HTTP_RESPONSE_STATUS_CODE
URL_PATH = url_attributes.URL_PATH
SERVICE_NAME = service_attributes.SERVICE_NAME  # a resource attribute

# --- released conventions newer than the package's oldest supported version ------------
PROVIDER = "gen_ai.provider.name"
CHOICE_COUNT = "gen_ai.request.choice.count"
STREAM = "gen_ai.request.stream"
CACHED_INPUT_TOKENS = "gen_ai.usage.cache_read.input_tokens"
REASONING_TOKENS = "gen_ai.usage.reasoning.output_tokens"
TIME_TO_FIRST_CHUNK = "gen_ai.response.time_to_first_chunk"
INPUT_MESSAGES = "gen_ai.input.messages"
OUTPUT_MESSAGES = "gen_ai.output.messages"
API_TYPE = "openai.api.type"
REQUEST_SERVICE_TIER = "openai.request.service_tier"
RESPONSE_SERVICE_TIER = "openai.response.service_tier"
SYSTEM_FINGERPRINT = "openai.response.system_fingerprint"

# --- Tokenlay's own ---------------------------------------------------------------------
ROUTED = "tokenlay.routed"
BYPASSED = "tokenlay.proxy.bypassed"
#: The Tokenlay base URL a call failed to reach (set on connection errors only).
PROXY_URL = "tokenlay.proxy.url"
RULE_ID = "tokenlay.rule.id"
RULE_ACTION = "tokenlay.rule.action"
LIMIT_EXCEEDED = "tokenlay.limit_exceeded"
MODEL_SHIFTED = "tokenlay.model_shifted"
COST = "tokenlay.cost.usd"
COST_SOURCE = "tokenlay.cost.source"
WARNING_EVENT = "tokenlay.warning"
WARNING_MESSAGE = "tokenlay.warning.message"
#: Free metadata fields are ``tokenlay.metadata.<field>``; standard ones ``tokenlay.<field>``.
METADATA_PREFIX = "tokenlay.metadata."
# The proxy's: how a call ended, where its usage came from, the model a rule chose,
# and what a limit gauge point is about.
PROXY_EXIT = "tokenlay.proxy.exit"
USAGE_SOURCE = "tokenlay.usage.source"
PROXY_MODEL = "tokenlay.model"
LIMIT_TYPE = "tokenlay.limit.type"
LIMIT_WINDOW = "tokenlay.limit.window"
LIMIT_FIELD = "tokenlay.limit.field"
LIMIT_VALUE = "tokenlay.limit.value"

# --- histogram buckets ------------------------------------------------------------------
#: Seconds: the GenAI conventions' advice for ``gen_ai.client.operation.duration``; the
#: proxy's upstream duration uses them too, so the two histograms line up.
DURATION_BUCKETS = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
)  # fmt: skip
#: Tokens: the GenAI conventions' advice for ``gen_ai.client.token.usage``.
TOKEN_BUCKETS = (
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864,
)  # fmt: skip


@functools.lru_cache(maxsize=1024)
def metadata_attribute(field: str) -> str:
    """``tokenlay.user`` ... for standard fields, ``tokenlay.metadata.<name>`` otherwise."""
    return f"tokenlay.{field}" if field in STANDARD_FIELDS else METADATA_PREFIX + field
