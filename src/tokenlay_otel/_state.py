"""The process's one telemetry state, shared by the instrumentor and every drop-in client.

One tracer, one set of instruments, one price book and one cardinality cap per process:
a cap per client would let three clients put three times the users on the metrics.
``instrument()`` installs the state built with its providers; without it, the first
client to record builds one from the environment and every later client shares it.

What else a process keeps between calls, and why each is needed:

- here, :data:`_SHARED_METRICS`: the metadata caps and the ``tokenlay.client.requests``
  tallies every telemetry of the process records into (see ``SharedMetrics``);
- ``_responses``: the proxy's metadata beside each returned object, for
  ``get_tokenlay_metadata`` (weak: an entry goes with its object);
- ``_fork``: the objects whose locks a forked child renews (weak);
- ``_wrappers``: what each client's fixed base URL and default headers give (bounded,
  a miss recomputes), and the log lines said once (or once a minute) so an outage or a
  bad field is one line, not one per call;
- ``_context``: the scoped metadata, a ``ContextVar`` (per task, not per process).
"""

from __future__ import annotations

import dataclasses
import threading

from opentelemetry import trace
from opentelemetry.metrics import MeterProvider

from ._config import Settings
from ._metrics import SharedMetrics
from ._safety import log
from ._telemetry import Telemetry

__all__ = ["build_telemetry", "current_telemetry", "install_telemetry", "uninstall_telemetry"]

_lock = threading.Lock()
_installed: Telemetry | None = None
_default: Telemetry | None = None
_SHARED_METRICS = SharedMetrics()


def build_telemetry(
    settings: Settings,
    tracer_provider: trace.TracerProvider | None = None,
    meter_provider: MeterProvider | None = None,
) -> Telemetry:
    """Telemetry from ``settings``, recording into the process's shared metrics; a
    prices file that cannot be used is an ERROR log line, and calls are priced without
    it (tracing is never given up for it)."""
    try:
        return Telemetry.create(
            settings=settings,
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
            shared=_SHARED_METRICS,
        )
    except Exception as exc:  # a prices file is outside data: whatever it holds, go on
        log.error("tokenlay_otel: %s; pricing with the built-in prices only", exc)
    return Telemetry.create(
        settings=dataclasses.replace(settings, prices_file=None),
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        shared=_SHARED_METRICS,
    )


def current_telemetry() -> Telemetry:
    """The telemetry every call records with: the installed one, else the shared default."""
    telemetry = _installed or _default
    return telemetry if telemetry is not None else _build_default()


def _build_default() -> Telemetry:
    global _default
    with _lock:
        if _default is None:
            settings, problems = Settings.read_env(routing=False)
            for problem in problems:
                log.error("tokenlay_otel: %s", problem)
            _default = build_telemetry(settings)
        return _default


def install_telemetry(telemetry: Telemetry) -> None:
    """``instrument()``: from now on every client records with ``telemetry``."""
    global _installed
    _installed = telemetry


def uninstall_telemetry() -> None:
    """``uninstrument()``: clients go back to the shared default."""
    global _installed
    _installed = None
