"""The ``tokenlay-otel`` command.

``tokenlay-otel spend --by org --since 24h`` reports spend from the ledger that the
``tokenlay_ledger`` exporter writes.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

from ._protocol import MAX_REPORTED_COST_USD, MAX_REPORTED_TOKENS
from ._version import __version__
from .exporters.ledger import DEFAULT_LEDGER_PATH, ENV_LEDGER_PATH, connect

__all__ = ["main", "spend_report"]

_GROUPS = {
    "org": "org",
    "user": "user",
    "model": "COALESCE(response_model, request_model)",
    "feature": "feature",
    "plan": "plan",
    "project": "project",
    "provider": "provider",
}
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_FIELDS = (
    "requests",
    "errors",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "cost_usd",
    "unpriced",
)


def parse_since(text: str, *, now: float | None = None) -> int:
    """``24h``, ``7d``, ``30m``, ``90s``, ``2w`` or ``all`` -> a start time in ns."""
    if text == "all":
        return 0
    match = re.fullmatch(r"(\d+)([smhdw])", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(
            f"invalid --since {text!r}: use a number and a unit (s, m, h, d, w), or 'all'"
        )
    seconds = int(match.group(1)) * _UNITS[match.group(2)]
    return int(((now if now is not None else time.time()) - seconds) * 1e9)


def _believed(column: str, most: str) -> str:
    """``column`` where it holds a count or cost the SDK would record, else NULL.

    The SDK never writes other values, but a ledger may hold rows from older versions
    or other writers: one of them must not break a report (SUM raises past int64) or
    turn a total into inf, which JSON cannot carry.
    """
    return f"(CASE WHEN {column} >= 0 AND {column} <= :{most} THEN {column} END)"


_TOKENS_SUMMED = ("input_tokens", "output_tokens", "cached_input_tokens")


def spend_report(path: str, by: str, since_unix_nano: int) -> list[dict[str, Any]]:
    """Spend grouped by one field, highest cost first (unknown values as ``None``)."""
    key = _GROUPS[by]
    cost = _believed("cost_usd", "most_cost")
    # TOTAL, not SUM: a float sum cannot overflow (and is exact below 2**53).
    tokens = ",\n".join(
        f"TOTAL({_believed(column, 'most_tokens')}) AS {column}" for column in _TOKENS_SUMMED
    )
    connection = connect(path)
    try:
        cursor = connection.execute(
            f"""
            SELECT {key} AS key,
                   COUNT(*) AS requests,
                   SUM(error_type IS NOT NULL) AS errors,
                   {tokens},
                   TOTAL({cost}) AS cost_usd,
                   SUM({cost} IS NULL AND error_type IS NULL) AS unpriced
            FROM llm_calls
            WHERE time_unix_nano >= :since
            GROUP BY key
            ORDER BY cost_usd DESC, requests DESC
            """,  # noqa: S608  # `key` and the columns come from the fixed tables above
            {
                "since": since_unix_nano,
                "most_tokens": MAX_REPORTED_TOKENS,
                "most_cost": MAX_REPORTED_COST_USD,
            },
        )
        names = [d[0] for d in cursor.description]
        report = [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
    finally:
        connection.close()
    for row in report:
        for column in _TOKENS_SUMMED:
            row[column] = int(row[column])
    return report


def _total(report: list[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {"key": "TOTAL"}
    for field in _FIELDS:
        total[field] = sum(row[field] for row in report)
    return total


def _print_table(report: list[dict[str, Any]], by: str, out: TextIO) -> None:
    header = [by, *_FIELDS]
    lines = [header]
    for row in [*report, _total(report)]:
        key = row["key"] if row["key"] is not None else "(none)"
        cells = [str(key)] + [f"{row[f]:.6f}" if f == "cost_usd" else str(row[f]) for f in _FIELDS]
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for n, line in enumerate(lines):
        if n == len(lines) - 1:
            out.write("  ".join("-" * w for w in widths) + "\n")
        out.write(
            "  ".join(
                cell.ljust(w) if i == 0 else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(line, widths, strict=True))
            )
            + "\n"
        )
        if n == 0:
            out.write("  ".join("-" * w for w in widths) + "\n")


def _spend(args: argparse.Namespace, out: TextIO) -> int:
    report = spend_report(args.db, args.by, args.since)
    if args.format == "json":
        # Every number is finite (see _believed); allow_nan=False keeps it so: no
        # Infinity or NaN, which are not JSON.
        data = {"by": args.by, "rows": report, "total": _total(report)}
        json.dump(data, out, indent=2, allow_nan=False)
        out.write("\n")
    elif args.format == "csv":
        writer = csv.writer(out)
        writer.writerow([args.by, *_FIELDS])
        for row in report:
            writer.writerow([row["key"], *(row[f] for f in _FIELDS)])
    else:
        _print_table(report, args.by, out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    # Plain text here: the module docstring's reST markup would show as is in --help.
    parser = argparse.ArgumentParser(
        prog="tokenlay-otel",
        description="Spend reports from the tokenlay_ledger exporter's ledger, and the "
        "local Tokenlay-compatible proxy.",
        epilog="'tokenlay-otel COMMAND --help' lists a command's flags.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    spend = commands.add_parser(
        "spend",
        help="spend by org, user, model, ... from the ledger",
        description="Requests, errors, tokens and cost from the spend ledger, grouped by "
        "one field, the highest cost first, with a TOTAL row.",
    )
    spend.add_argument(
        "--by", choices=sorted(_GROUPS), default="org", help="group by (default: %(default)s)"
    )
    spend.add_argument(
        "--since",
        type=parse_since,
        default="24h",
        help="calls since this long ago: 90s, 30m, 24h, 7d, 2w, or all (default: %(default)s)",
    )
    spend.add_argument(
        "--db",
        default=os.environ.get(ENV_LEDGER_PATH) or DEFAULT_LEDGER_PATH,
        help=f"ledger file (default: ${ENV_LEDGER_PATH} or ./{DEFAULT_LEDGER_PATH})",
    )
    spend.add_argument(
        "--format",
        choices=("table", "json", "csv"),
        default="table",
        help="output format (default: %(default)s)",
    )
    spend.set_defaults(run=_spend)
    from .proxy.serve import add_arguments, run

    proxy = commands.add_parser(
        "proxy",
        help="run the local Tokenlay-compatible proxy",
        description="Serve the Tokenlay-compatible gateway: rules, limits, usage "
        "accounting, OpenTelemetry; --mock-upstream answers offline.",
    )
    add_arguments(proxy)
    proxy.set_defaults(run=lambda args, out: run(args))
    return parser


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args, out or sys.stdout))


if __name__ == "__main__":
    sys.exit(main())
