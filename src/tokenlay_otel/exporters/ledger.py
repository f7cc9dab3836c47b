"""The spend ledger: one SQLite row per LLM span, for ``tokenlay-otel spend``.

Registered as the ``tokenlay_ledger`` traces exporter, so
``opentelemetry-instrument --traces_exporter otlp,tokenlay_ledger`` keeps a local,
queryable record of who spent what next to the traces. Rows are written one batch per
transaction; several processes can share one file (WAL journal, busy timeout), and a
span exported twice is stored once.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import StatusCode

from tokenlay_otel._conventions import (
    CACHED_INPUT_TOKENS,
    COST,
    COST_SOURCE,
    ERROR_TYPE,
    INPUT_TOKENS,
    METADATA_PREFIX,
    OPERATION,
    OUTPUT_TOKENS,
    PROVIDER,
    REQUEST_MODEL,
    RESPONSE_MODEL,
    ROUTED,
    RULE_ACTION,
    SERVICE_NAME,
    metadata_attribute,
)
from tokenlay_otel._fork import renew_after_fork
from tokenlay_otel._wire import (
    MAX_REPORTED_COST_USD,
    MAX_REPORTED_TOKENS,
    STANDARD_FIELDS,
    encodable,
)

__all__ = ["DEFAULT_LEDGER_PATH", "ENV_LEDGER_PATH", "LedgerSpanExporter", "connect", "row_of"]

_log = logging.getLogger("tokenlay_otel")

#: Where the ledger lives, default ``./tokenlay-ledger.db``.
ENV_LEDGER_PATH = "TOKENLAY_LEDGER_PATH"
DEFAULT_LEDGER_PATH = "tokenlay-ledger.db"
_SCOPE = "tokenlay_otel"

COLUMNS = (
    "time_unix_nano",
    "trace_id",
    "span_id",
    "service",
    "operation",
    *STANDARD_FIELDS,
    "metadata",
    "provider",
    "request_model",
    "response_model",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "cost_usd",
    "cost_source",
    "rule_action",
    "routed",
    "error_type",
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS llm_calls (
    time_unix_nano INTEGER NOT NULL,
    trace_id TEXT NOT NULL,
    span_id TEXT NOT NULL,
    service TEXT,
    operation TEXT,
{fields}
    metadata TEXT,
    provider TEXT,
    request_model TEXT,
    response_model TEXT,
    input_tokens INTEGER,
    output_tokens INTEGER,
    cached_input_tokens INTEGER,
    cost_usd REAL,
    cost_source TEXT,
    rule_action TEXT,
    routed INTEGER,
    error_type TEXT,
    PRIMARY KEY (trace_id, span_id)
);
CREATE INDEX IF NOT EXISTS llm_calls_time ON llm_calls (time_unix_nano);
""".format(fields="\n".join(f"    {field} TEXT," for field in STANDARD_FIELDS))


def connect(path: str | os.PathLike[str]) -> sqlite3.Connection:
    """Open (and create if needed) a ledger database."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(str(path), timeout=30, check_same_thread=False)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA busy_timeout=30000")
    connection.executescript(_SCHEMA)
    return connection


# The numeric columns taken from attributes, and the largest value each keeps; the
# other columns taken from attributes are text. Those in _COMPUTED are built here.
_BOUNDS: dict[str, int | float] = {
    "input_tokens": MAX_REPORTED_TOKENS,
    "output_tokens": MAX_REPORTED_TOKENS,
    "cached_input_tokens": MAX_REPORTED_TOKENS,
    "cost_usd": MAX_REPORTED_COST_USD,
}
_COMPUTED = frozenset({"time_unix_nano", "trace_id", "span_id", "metadata", "routed"})


def _storable(column: str, value: Any) -> bool:
    """Whether SQLite can take ``value`` for ``column`` as the ledger means it.

    A span's attributes may hold what SQLite refuses (an int past int64, a list, a
    lone surrogate in a str) or what would spoil a sum (inf, NaN, a negative count).
    """
    if value is None or column in _COMPUTED:
        return True
    bound = _BOUNDS.get(column)
    if bound is None:
        return type(value) is str and encodable(value)
    kind = type(value)
    if kind is int or (kind is float and column == "cost_usd"):
        number: float = value
        return 0 <= number <= bound  # NaN fails it too
    return False


def row_of(span: ReadableSpan) -> tuple[Any, ...] | None:
    """The ledger row of an LLM span we recorded, or ``None`` for any other span.

    Ours, or another openai instrumentation's span that carries our attributes (see
    ``_coexist``; we set ``tokenlay.routed`` on every LLM span we record).

    A value SQLite cannot store, or that is out of range, is left out (``NULL``).
    """
    values = _values_of(span)
    return None if values is None else _row(values)[0]


def _values_of(span: ReadableSpan) -> dict[str, Any] | None:
    scope = span.instrumentation_scope
    attrs = span.attributes or {}
    ours = scope is not None and scope.name == _SCOPE
    if OPERATION not in attrs or not (ours or ROUTED in attrs):
        return None
    context = span.get_span_context()
    custom = {
        key.removeprefix(METADATA_PREFIX): value
        for key, value in attrs.items()
        if key.startswith(METADATA_PREFIX)
    }
    error = attrs.get(ERROR_TYPE)
    if error is None and span.status.status_code is StatusCode.ERROR:
        error = "error"
    return {
        "time_unix_nano": span.start_time or 0,
        "trace_id": format(context.trace_id, "032x") if context else "",
        "span_id": format(context.span_id, "016x") if context else "",
        "service": span.resource.attributes.get(SERVICE_NAME),
        "operation": attrs.get(OPERATION),
        **{field: attrs.get(metadata_attribute(field)) for field in STANDARD_FIELDS},
        "metadata": json.dumps(custom, sort_keys=True) if custom else None,
        "provider": attrs.get(PROVIDER),
        "request_model": attrs.get(REQUEST_MODEL),
        "response_model": attrs.get(RESPONSE_MODEL),
        "input_tokens": attrs.get(INPUT_TOKENS),
        "output_tokens": attrs.get(OUTPUT_TOKENS),
        "cached_input_tokens": attrs.get(CACHED_INPUT_TOKENS),
        "cost_usd": attrs.get(COST),
        "cost_source": attrs.get(COST_SOURCE),
        "rule_action": attrs.get(RULE_ACTION),
        "routed": int(bool(attrs.get(ROUTED))),
        "error_type": error,
    }


def _row(values: dict[str, Any]) -> tuple[tuple[Any, ...], list[str]]:
    """The row to store and the columns whose value was left out."""
    dropped = [column for column in COLUMNS if not _storable(column, values[column])]
    if dropped:
        values = {**values, **dict.fromkeys(dropped)}
    return tuple(values[column] for column in COLUMNS), dropped


class LedgerSpanExporter(SpanExporter):
    """Writes one row per LLM span into SQLite.

    Args:
        path: the database file (default: ``TOKENLAY_LEDGER_PATH``, else
            ``./tokenlay-ledger.db``).
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path or os.environ.get(ENV_LEDGER_PATH) or DEFAULT_LEDGER_PATH)
        self._connection: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._dropped_reported = False
        renew_after_fork(self)

    def _after_fork(self) -> None:
        # SQLite forbids using a connection opened before fork() in the child; this one
        # is left alone (closing it could touch the parent's locks) and a new one opened.
        self._connection = None

    def _db(self) -> sqlite3.Connection:
        if self._connection is None:
            self._connection = connect(self.path)
        return self._connection

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        rows = []
        dropped: set[str] = set()
        for span in spans:
            values = _values_of(span)
            if values is not None:
                row, left_out = _row(values)
                rows.append(row)
                dropped.update(left_out)
        if dropped:
            self._report_dropped(dropped)
        if not rows:
            return SpanExportResult.SUCCESS
        placeholders = ", ".join("?" for _ in COLUMNS)
        statement = (
            f"INSERT OR IGNORE INTO llm_calls ({', '.join(COLUMNS)}) VALUES ({placeholders})"  # noqa: S608  # fixed column names
        )
        try:
            with self._lock:
                db = self._db()
                with db:
                    db.executemany(statement, rows)
        except sqlite3.Error:
            _log.warning(
                "tokenlay_otel: could not write %d rows to %s", len(rows), self.path, exc_info=True
            )
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def _report_dropped(self, columns: set[str]) -> None:
        # Once a warning, then at debug: a source of bad values sends them on every call.
        level = logging.DEBUG if self._dropped_reported else logging.WARNING
        self._dropped_reported = True
        _log.log(
            level,
            "tokenlay_otel: the ledger left out values it cannot store or believe (%s); "
            "their rows are written without them",
            ", ".join(sorted(columns)),
        )

    def shutdown(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def rows(path: str | os.PathLike[str], since_unix_nano: int = 0) -> Iterable[sqlite3.Row]:
    """Ledger rows since a time, as ``sqlite3.Row`` objects."""
    connection = connect(path)
    connection.row_factory = sqlite3.Row
    try:
        yield from connection.execute(
            "SELECT * FROM llm_calls WHERE time_unix_nano >= ? ORDER BY time_unix_nano",
            (since_unix_nano,),
        )
    finally:
        connection.close()
