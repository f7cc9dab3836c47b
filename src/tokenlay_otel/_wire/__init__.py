"""Tokenlay wire protocol v1: the one contract the SDK and the proxy both import.

Pure functions only: nothing here touches a span, a client or the network, so every
rule of the protocol can be tested with plain data, and each side's builder is tested
against the other side's parser (build -> parse -> equal).

- :mod:`.fields`: the standard metadata fields; what a field name and value may be.
- :mod:`.request`: the request headers (built by the SDK, read by the proxy), the
  metered endpoints, the streaming usage option.
- :mod:`.response`: the ``x-tokenlay-*`` response headers (built by the proxy, read by
  the SDK) and the bounds on reported tokens and cost.
"""

from .fields import (
    HEADER_PREFIX,
    MAX_VALUE_LENGTH,
    PROVIDER_BASE_HEADER,
    PROVIDER_KEY_HEADER,
    STANDARD_FIELDS,
    decode_value,
    decode_wire_value,
    encode_value,
    normalize_field_name,
    parse_metadata_env,
    sanitize_metadata,
    validate_metadata,
)
from .request import (
    METERED_ENDPOINTS,
    USAGE_OPTION_ENDPOINTS,
    build_request_headers,
    field_header,
    metadata_from_request_headers,
    metadata_from_wire,
    metered_endpoint,
    proxy_url,
    split_caller_headers,
    usage_option_given,
    usage_option_on,
    with_usage_option,
)
from .response import (
    MAX_REPORTED_COST_USD,
    MAX_REPORTED_TOKENS,
    RuleAction,
    TokenlayResponseMetadata,
    encodable,
    format_cost,
    is_header_text,
    parse_response_headers,
    response_headers,
)

__all__ = [
    "HEADER_PREFIX",
    "MAX_REPORTED_COST_USD",
    "MAX_REPORTED_TOKENS",
    "MAX_VALUE_LENGTH",
    "METERED_ENDPOINTS",
    "PROVIDER_BASE_HEADER",
    "PROVIDER_KEY_HEADER",
    "STANDARD_FIELDS",
    "USAGE_OPTION_ENDPOINTS",
    "RuleAction",
    "TokenlayResponseMetadata",
    "build_request_headers",
    "decode_value",
    "decode_wire_value",
    "encodable",
    "encode_value",
    "field_header",
    "format_cost",
    "is_header_text",
    "metadata_from_request_headers",
    "metadata_from_wire",
    "metered_endpoint",
    "normalize_field_name",
    "parse_metadata_env",
    "parse_response_headers",
    "proxy_url",
    "response_headers",
    "sanitize_metadata",
    "split_caller_headers",
    "usage_option_given",
    "usage_option_on",
    "validate_metadata",
    "with_usage_option",
]
