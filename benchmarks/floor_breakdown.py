"""What each part of the emitted telemetry costs the OpenTelemetry SDK, per call.

    python benchmarks/floor_breakdown.py            # sync chat and sync 20-chunk stream
    python benchmarks/floor_breakdown.py --only chat

The floor of ``overhead.py`` taken apart. tokenlay's span and metric records, captured
from a real call, are replayed straight into the SDK whole and then with one part left
out at a time; the official ``opentelemetry-instrumentation-genai-openai``'s own
telemetry (else the deprecated ``openai-v2``'s) is replayed the same way when installed.
Counted in CPU instructions under callgrind, as ``instructions.py`` counts (needs
valgrind), so a difference of a few thousand instructions is real, not noise.

A part's cost is what leaving it out saves: the price of each piece of the telemetry
contract, next to what the official instrumentation's whole overhead is.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
from collections.abc import Callable
from typing import Any

#: Metric attributes that carry attribution (DESIGN: metrics "tagged by user and org").
_ATTRIBUTION = ("tokenlay.user", "tokenlay.org")


def _without_records(plan: Any, *names: str) -> Any:
    return dataclasses.replace(plan, records=[r for r in plan.records if r[0] not in names])


def _without_attributes(plan: Any, names: tuple[str, ...]) -> Any:
    records = [
        (name, kind, value, {k: v for k, v in attrs.items() if k not in names})
        for name, kind, value, attrs in plan.records
    ]
    return dataclasses.replace(plan, records=records)


def _says_nothing(value: Any) -> bool:
    return value is False or (type(value) is int and value == 0)


def _without_defaults(plan: Any) -> Any:
    """The span without the attributes that only say "zero" or "no"."""

    def keep(attrs: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in attrs.items() if not _says_nothing(v)}

    return dataclasses.replace(
        plan, start_attributes=keep(plan.start_attributes), end_attributes=keep(plan.end_attributes)
    )


def variants(plan: Any) -> list[tuple[str, Any]]:
    """tokenlay's telemetry, whole and with one part left out at a time."""
    return [
        ("tokenlay: span and records", plan),
        ("span only", dataclasses.replace(plan, records=[])),
        ("records only", dataclasses.replace(plan, span=False)),
        ("without the cost record", _without_records(plan, "tokenlay.client.cost")),
        ("without token.usage", _without_records(plan, "gen_ai.client.token.usage")),
        ("without user, org on records", _without_attributes(plan, _ATTRIBUTION)),
        ("without 0 / false span values", _without_defaults(plan)),
    ]


def child(args: argparse.Namespace) -> None:
    """Under callgrind: count every replay, print the plan (labels in order)."""
    import instructions
    import overhead as bench

    providers = bench.sdk_providers()
    configs = {c.label: c for c in bench.instrumentations(references=True)}
    official = configs.get("official genai-openai", configs.get("official openai-v2"))
    plan: list[tuple[str, str, int]] = []
    with bench.quiet_content_capture():
        for scenario in bench.scenarios(args.chunks):
            if scenario.is_async or (args.only and args.only not in scenario.name):
                continue
            ours = bench.replay_of(bench.capture(scenario, configs["tokenlay"]))
            sections = variants(ours)
            if official is not None:
                theirs = bench.replay_of(bench.capture(scenario, official))
                sections.append(("official: span and records", theirs))
            for label, replay_plan in sections:
                replay = bench.floor_call(replay_plan, providers)
                bench.floor_us(replay, 100)  # warm-up: first points of each attribute set
                count: Callable[[], object] = functools.partial(bench.floor_us, replay, args.calls)
                instructions.counted(count)
                plan.append((scenario.name, label, args.calls))
    print(json.dumps(plan))


def report(plan: list[tuple[str, str, int]], counts: list[int]) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    for (scenario, label, calls), count in zip(plan, counts, strict=True):
        results.setdefault(scenario, {})[label] = count / calls
    print(f"{'scenario':<26} {'replayed':<32} {'k instr/call':>12} {'saves':>8}")
    for scenario, per_call in results.items():
        whole = next(iter(per_call.values()))
        for i, (label, per) in enumerate(per_call.items()):
            whole_set = label.startswith(("tokenlay", "official"))
            saves = "" if whole_set else f"{(whole - per) / 1000:.1f}"
            print(f"{scenario if i == 0 else '':<26} {label:<32} {per / 1000:>12.1f} {saves:>8}")
    return results


def main() -> int:
    import instructions

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200, help="counted replays per part")
    return instructions.command_line(__file__, parser, child, report)


if __name__ == "__main__":
    sys.exit(main())
