"""The ``tokenlay-otel`` command.

``tokenlay-otel spend --by org --since 24h`` reports spend from the ledger that the
``tokenlay_ledger`` exporter writes.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import sqlite3
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from ._version import __version__
from ._wire import MAX_REPORTED_COST_USD, MAX_REPORTED_TOKENS, STANDARD_FIELDS
from .exporters.ledger import DEFAULT_LEDGER_PATH, ENV_LEDGER_PATH

__all__ = ["main", "spend_report"]

# --by choice -> SQL expression; each standard metadata field is a ledger column.
_GROUPS = {
    **{field: field for field in STANDARD_FIELDS},
    "model": "COALESCE(response_model, request_model)",
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


def _open_ledger(path: str | os.PathLike[str]) -> sqlite3.Connection:
    """An existing ledger, opened without creating anything (no file, no folder, no
    table): a report on a mistyped path is an error, not an empty new database."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"no spend ledger at {file}")
    # mode=rw, not ro: a reader of a WAL database may need to write its -shm file.
    connection = sqlite3.connect(file.resolve().as_uri() + "?mode=rw", uri=True, timeout=30)
    try:
        connection.execute("SELECT 1 FROM llm_calls LIMIT 1")
    except sqlite3.DatabaseError as exc:  # not SQLite at all, or no llm_calls table
        connection.close()
        raise ValueError(f"{file} is not a spend ledger ({exc})") from None
    return connection


def spend_report(path: str, by: str, since_unix_nano: int) -> list[dict[str, Any]]:
    """Spend grouped by one field, highest cost first (unknown values as ``None``).

    Raises:
        FileNotFoundError: there is no file at ``path``.
        ValueError: the file is not a spend ledger.
    """
    key = _GROUPS[by]
    cost = _believed("cost_usd", "most_cost")
    # TOTAL, not SUM: a float sum cannot overflow (and is exact below 2**53).
    tokens = ",\n".join(
        f"TOTAL({_believed(column, 'most_tokens')}) AS {column}" for column in _TOKENS_SUMMED
    )
    connection = _open_ledger(path)
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


#: Significant digits of a cost in JSON and CSV: float sums drift in the 16th or 17th
#: (0.1 + 0.2 is 0.30000000000000004); money needs far fewer than 12.
_COST_DIGITS = 12


def _clean(row: dict[str, Any]) -> dict[str, Any]:
    """The row with its cost rounded to ``_COST_DIGITS`` significant digits."""
    return {**row, "cost_usd": float(f"{row['cost_usd']:.{_COST_DIGITS}g}")}


#: Decimals of the table's cost column, more when a cost needs them (see _cost_cells).
_COST_DECIMALS = 6
_MOST_DECIMALS = 15


def _cost_cells(costs: list[float]) -> list[str]:
    """The table's cost column: one number of decimals, enough to show three significant
    digits of the smallest cost that is not 0, so a priced call never reads 0.000000."""
    decimals = _COST_DECIMALS
    for cost in costs:
        if cost > 0:
            decimals = max(decimals, 2 - math.floor(math.log10(cost)))
    decimals = min(decimals, _MOST_DECIMALS)
    # Below 1e-13 even the most decimals would read 0: those few say it in exponent form.
    return [
        f"{cost:.3g}" if 0 < cost < 10**-_MOST_DECIMALS else f"{cost:.{decimals}f}"
        for cost in costs
    ]


def _print_table(report: list[dict[str, Any]], by: str, out: TextIO) -> None:
    header = [by, *_FIELDS]
    lines = [header]
    rows = [*report, _total(report)]
    costs = iter(_cost_cells([row["cost_usd"] for row in rows]))
    for row in rows:
        key = row["key"] if row["key"] is not None else "(none)"
        cells = [str(key)] + [next(costs) if f == "cost_usd" else str(row[f]) for f in _FIELDS]
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
    try:
        report = spend_report(args.db, args.by, args.since)
    except (OSError, ValueError) as exc:
        print(f"tokenlay-otel spend: {exc}", file=sys.stderr)
        return 1
    total = _clean(_total(report))
    if args.format == "json":
        # Every number is finite (see _believed); allow_nan=False keeps it so: no
        # Infinity or NaN, which are not JSON.
        data = {"by": args.by, "rows": [_clean(row) for row in report], "total": total}
        json.dump(data, out, indent=2, allow_nan=False)
        out.write("\n")
    elif args.format == "csv":
        writer = csv.writer(out)
        writer.writerow([args.by, *_FIELDS])
        # The last row is the TOTAL, as in the table (a spreadsheet sums the rest).
        for row in [*map(_clean, report), total]:
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
