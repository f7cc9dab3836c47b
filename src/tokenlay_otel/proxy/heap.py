"""A served process's heap, set up so that the garbage collector's pauses stay short.

CPython's cyclic collector stops the event loop while it walks a generation. A full
(generation 2) collection walks every object the process holds, and the proxy holds a
lot that never changes: the openai SDK and its pydantic models (imported with the
package, ~840 modules, costly to traverse) and genai-prices' table (~20,000 objects,
loaded by the first priced call). Under load a full collection came every ~1.3 s (the
promotions of calls in flight add up to a quarter of the old generation) and took
53-80 ms (gc.callbacks): every call in flight waited for it. benchmarks/gateways.py
(2 cores, wrk, 16 connections): p99 74-97 ms, allow rule and SQLite limits alike, for
a 9 ms median, the slowest 3-4 % of calls; with this set-up, full collections take 4-9 ms
and p99 is 15-29 ms (14.5 ms measured with the collector off; the spread is the machine).
With the pooled upstream client (3-5 ms median): p99 71-76 -> 9-11 ms, CPU per call
0.33-0.37 -> 0.31-0.33 ms; RSS flat over 120 s of load.

So once the process has started: load what calls would load lazily, collect the
start-up garbage, and freeze the rest (``gc.freeze``: moved out of the generations, so
no collection walks it again; it lives as long as the process anyway). Collections
still run as before for everything created later, so cyclic garbage stays bounded.
"""

from __future__ import annotations

import gc

from tokenlay_otel._pricing import load_prices

__all__ = ["settle"]


def settle() -> None:
    """Preload the price table, collect, then freeze what is left (see the module doc).

    Call once the server is set up and before it serves: what is created later (calls,
    connections) is collected as usual."""
    load_prices()
    gc.collect()
    gc.freeze()
