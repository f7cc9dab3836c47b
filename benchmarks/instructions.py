"""CPU instructions per call, counted by valgrind's callgrind: overhead.py's comparison
without the machine's noise.

    python benchmarks/instructions.py            # sync chat and sync 20-chunk stream
    python benchmarks/instructions.py --calls 100 --only chat

Time on a shared VM moves by tens of percent from one second to the next; an
instruction count does not move at all. It runs the same scenarios, configurations and
floor as ``overhead.py`` under ``valgrind --tool=callgrind`` (~50x slower, so a few
minutes) and reports instructions per call. The counts leave out what time shows:
cache misses, which is why a floor replayed in a loop is faster than the same replay
after an openai call. Needs valgrind (``apt-get install valgrind``).

How: callgrind counts only inside ``functools.reduce`` (the C function
``functools_reduce``) and writes one profile each time it returns; each counted
section runs its calls inside one ``reduce`` step.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: Label prefix of a configuration's own telemetry replayed (its own floor).
OWN_FLOOR = "own floor: "
_TOTALS = re.compile(rb"^(?:totals|summary):\s*(\d+)", re.MULTILINE)


def counted(section: Callable[[], object]) -> None:
    """Run ``section`` where callgrind counts (see the module docstring).

    The objects alive before are frozen out of the GC's view: a full collection scans
    every live object of the process, and whether one falls into a short section or
    not would move its count by hundreds of thousands of instructions per call. The
    young collections that the section's own allocations cause are still counted.
    """
    gc.collect()
    gc.freeze()
    try:
        functools.reduce(lambda _, __: section(), range(1), None)
    finally:
        gc.unfreeze()


def child(args: argparse.Namespace) -> None:
    """Under callgrind: run every section once, print their labels in order."""
    import overhead as bench

    plan: list[tuple[str, str, int]] = []
    providers = bench.sdk_providers()
    configs = bench.instrumentations(references=not args.no_references)
    with bench.quiet_content_capture():
        for scenario in bench.scenarios(args.chunks):
            if scenario.is_async or (args.only and args.only not in scenario.name):
                continue
            bench.check_exports(scenario, configs)
            telemetry = bench.capture(scenario, configs[0])
            replay = bench.floor_call(bench.replay_of(telemetry), providers)
            in_call = bench.with_replay(scenario, replay)
            calls = args.calls
            run = functools.partial(bench.run_calls, scenario, calls)
            sections: list[tuple[str, Callable[[], object], Any]] = [
                ("none", run, None),
                (bench.FLOOR, functools.partial(bench.floor_us, replay, calls), None),
                (bench.FLOOR_IN_CALL, functools.partial(bench.run_calls, in_call, calls), None),
                *((config.label, run, config) for config in configs),
            ]
            # Each reference's own telemetry replayed too (see overhead.measure).
            for config in configs[1:]:
                try:
                    own = bench.floor_call(
                        bench.replay_of(bench.capture(scenario, config)), providers
                    )
                except ValueError:
                    continue
                own_floor = functools.partial(bench.floor_us, own, calls)
                sections.append((f"{OWN_FLOOR}{config.label}", own_floor, None))
            for label, section, config in sections:
                if config is not None:
                    config.on(providers)
                try:
                    # Warm-up, not counted: every user once, as the counted calls are
                    # (the SDK's first point of a new attribute set costs far more).
                    bench.run_calls(scenario, 100)
                    counted(section)
                finally:
                    if config is not None:
                        config.off()
                plan.append((scenario.name, label, calls))
    print(json.dumps(plan))


def totals(directory: Path) -> list[int]:
    """Instructions of each dump, in the order written."""
    dumps = sorted(
        (p for p in directory.iterdir() if re.search(r"\.\d+$", p.name)),
        key=lambda p: int(p.name.rsplit(".", 1)[1]),
    )
    found = []
    for path in dumps:
        match = _TOTALS.search(path.read_bytes())
        found.append(int(match.group(1)) if match else 0)
    return found


def under_callgrind(
    script: str, forwarded: list[str]
) -> tuple[list[tuple[Any, ...]], list[int]] | int:
    """Run ``script --child`` under callgrind: the plan its child printed (its last
    line, JSON) and the instructions of each counted section; an exit code on failure."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        command = [
            valgrind, "--tool=callgrind", "--collect-atstart=no",
            "--toggle-collect=functools_reduce", "--dump-after=functools_reduce",
            f"--callgrind-out-file={tmp}/cg.out",
            sys.executable, script, "--child", *forwarded,
        ]  # fmt: skip
        # A fixed hash seed: string hashes decide how dicts and sets probe, so a random
        # one gives each run slightly different work (see the README for how much).
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            return done.returncode
        *said, last = done.stdout.strip().splitlines()
        for line in said:  # what the child said before its plan: skips, exports
            print(line)
        plan = [tuple(item) for item in json.loads(last)]
        # Libraries may call reduce() at import time too: ours are the last dumps.
        return plan, totals(Path(tmp))[-len(plan) :]


def report(plan: list[tuple[str, str, int]], counts: list[int]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for (scenario, label, calls), count in zip(plan, counts, strict=True):
        results.setdefault(scenario, {})[label] = count / calls
    print(
        f"{'scenario':<26} {'configuration':<22} {'k instr/call':>12} {'overhead':>9}"
        f" {'/floor':>7} {'/in-call':>9} {'own floor':>9} {'-own':>7}"
    )
    from overhead import FLOOR, FLOOR_IN_CALL

    for scenario, per_call in results.items():
        none = per_call["none"]
        floor = per_call[FLOOR]
        in_call = per_call[FLOOR_IN_CALL] - none
        print(f"{scenario:<26} {'none':<22} {none / 1000:>12.1f}")
        print(f"{'':<26} {FLOOR:<22} {floor / 1000:>12.1f}")
        print(f"{'':<26} {FLOOR_IN_CALL:<22} {'':>12} {in_call / 1000:>9.1f}")
        configs = [c for c in per_call if c not in ("none", FLOOR, FLOOR_IN_CALL)]
        for label in configs:
            if label.startswith(OWN_FLOOR):
                continue
            over = per_call[label] - none
            # The first configuration's telemetry is the floor; the others' were
            # replayed on their own.
            own = floor if label == configs[0] else per_call.get(OWN_FLOOR + label)
            own_text = "" if own is None else f" {own / 1000:>9.1f} {(over - own) / 1000:>7.1f}"
            print(
                f"{'':<26} {label:<22} {per_call[label] / 1000:>12.1f} {over / 1000:>9.1f}"
                f" {over / floor:>7.2f} {over / in_call:>9.2f}{own_text}"
            )
    return results


def command_line(
    script: str,
    parser: argparse.ArgumentParser,
    child: Callable[[argparse.Namespace], None],
    report: Callable[[Any, list[int]], dict[str, Any]],
) -> int:
    """A counting script's main: ``child`` under callgrind, then ``report`` its counts.

    ``parser`` has the script's own options; the shared ones are added here."""
    parser.add_argument("--chunks", type=int, default=20)
    parser.add_argument("--only", help="run the scenarios whose name contains this")
    parser.add_argument("--json", metavar="FILE", help="also write the results here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return 0
    forwarded = [a for a in sys.argv[1:] if a != "--json" and a != args.json]
    found = under_callgrind(script, forwarded)
    if isinstance(found, int):
        return found
    results = report(*found)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=60, help="counted calls per section")
    parser.add_argument("--no-references", action="store_true", help="tokenlay only")
    return command_line(__file__, parser, child, report)


if __name__ == "__main__":
    sys.exit(main())
