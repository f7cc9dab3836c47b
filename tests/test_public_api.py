from __future__ import annotations

import tokenlay_otel


def test_all_is_sorted_and_matches_what_is_exposed() -> None:
    exposed = {name for name in dir(tokenlay_otel) if not name.startswith("_")}
    exposed -= {"testing", "exporters", "cli", "proxy"}  # public submodules
    assert set(tokenlay_otel.__all__) - {"__version__"} == exposed
    assert list(tokenlay_otel.__all__) == sorted(tokenlay_otel.__all__)


def test_version_is_a_string() -> None:
    assert isinstance(tokenlay_otel.__version__, str)
