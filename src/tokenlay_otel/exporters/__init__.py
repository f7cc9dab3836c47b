"""Named exporters and :func:`configure`; the spend ledger exporter."""

from ._configure import Configured, configure
from .ledger import LedgerSpanExporter

__all__ = ["Configured", "LedgerSpanExporter", "configure"]
