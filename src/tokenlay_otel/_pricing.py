"""Cost of a call: the proxy's figure, else local prices (overrides, then genai-prices).

Prices are looked up once per (provider URL, model) and cached as plain per-token rates,
so a call costs a dict lookup and three multiplications. ``genai-prices`` is used with
its bundled data only; its network updater is never started.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from ._fork import renew_after_fork
from ._safety import log
from ._usage import Usage
from ._wire import MAX_REPORTED_COST_USD

__all__ = [
    "CostSource",
    "ModelRates",
    "PriceBook",
    "load_price_overrides",
    "load_prices",
    "warm_up",
]

CostSource = Literal["proxy", "local", "unknown"]
_PER_MILLION = 1_000_000


@dataclass(frozen=True, slots=True)
class ModelRates:
    """USD per token (not per million) for one model."""

    input: float
    output: float
    cached_input: float | None = None

    def cost(self, usage: Usage) -> float | None:
        if usage.input_tokens is None and usage.output_tokens is None:
            return None
        input_tokens = usage.input_tokens or 0
        cached = min(usage.cached_input_tokens or 0, input_tokens)
        cached_rate = self.input if self.cached_input is None else self.cached_input
        # Output tokens already include reasoning tokens, billed at the output rate.
        return (
            (input_tokens - cached) * self.input
            + cached * cached_rate
            + (usage.output_tokens or 0) * self.output
        )


def _rate(entry: Mapping[str, Any], key: str, *, source: str, model: str) -> float | None:
    value = entry.get(key)
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0 <= value <= _MAX_RATE  # NaN fails both comparisons
    ):
        raise ValueError(
            f"{source}: model {model!r}: {key!r} must be a number of USD per 1M tokens "
            f"from 0 to {_MAX_RATE:g}, got {str(value)[:40]}"
        )
    return float(value) / _PER_MILLION


def load_price_overrides(path: str | Path) -> dict[str, ModelRates]:
    """Read a prices file: ``{model: {input, output, cached}}`` in USD per 1M tokens.

    JSON, or YAML when the file ends in ``.yaml``/``.yml`` (needs PyYAML).

    Raises:
        ValueError: naming the file and the entry that is wrong.
    """
    file = Path(path)
    source = str(file)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"{source}: cannot read the prices file ({exc.strerror})") from None
    try:
        if file.suffix.lower() in (".yaml", ".yml"):
            try:
                import yaml  # type: ignore[import-untyped,import-not-found]
            except ImportError:
                raise ValueError(
                    f"{source}: reading YAML needs PyYAML (pip install pyyaml), or use JSON"
                ) from None
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{source}: not valid JSON: {exc}") from None
    except ValueError as exc:  # ours, or the parser's (a number with thousands of digits)
        if str(exc).startswith(source):
            raise
        raise ValueError(f"{source}: {exc}") from None
    except Exception as exc:  # yaml.YAMLError and friends
        raise ValueError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a mapping of model name to prices")
    rates: dict[str, ModelRates] = {}
    for model, entry in data.items():
        if not isinstance(entry, dict):
            raise ValueError(f"{source}: model {model!r}: expected {{input, output, cached}}")
        unknown = set(entry) - {"input", "output", "cached"}
        if unknown:
            raise ValueError(f"{source}: model {model!r}: unknown keys {sorted(unknown)}")
        input_rate = _rate(entry, "input", source=source, model=model)
        output_rate = _rate(entry, "output", source=source, model=model)
        if input_rate is None or output_rate is None:
            raise ValueError(f"{source}: model {model!r}: 'input' and 'output' are required")
        cached = _rate(entry, "cached", source=source, model=model)
        rates[str(model).lower()] = ModelRates(input_rate, output_rate, cached)
    return rates


@dataclass(frozen=True, slots=True)
class _TieredRates:
    """A model whose price depends on the call's size: priced per call by genai-prices."""

    model: str
    provider_url: str | None

    def cost(self, usage: Usage) -> float | None:
        from genai_prices import Usage as PricesUsage
        from genai_prices import calc_price

        if usage.input_tokens is None and usage.output_tokens is None:
            return None
        calc = calc_price(
            PricesUsage(
                input_tokens=usage.input_tokens or 0,
                cache_read_tokens=usage.cached_input_tokens or 0,
                output_tokens=usage.output_tokens or 0,
            ),
            self.model,
            provider_api_url=self.provider_url,
        )
        return float(calc.total_price)


def _genai_rates(model: str, provider_url: str | None) -> ModelRates | _TieredRates | None:
    """Flat per-token rates from genai-prices' bundled data, or ``None``."""
    from genai_prices import Usage as PricesUsage
    from genai_prices import calc_price

    probe = PricesUsage(input_tokens=_PER_MILLION, output_tokens=_PER_MILLION)
    calc = None
    # An unknown host (a proxy, a local server): match by the model name alone, then as
    # an OpenAI model (this is the openai client, and OpenAI-compatible names are common).
    for where in ({"provider_api_url": provider_url}, {}, {"provider_id": "openai"}):
        if where.get("provider_api_url", "") is None:
            continue
        try:
            calc = calc_price(probe, model, **where)
        except LookupError:
            continue
        provider_url = where.get("provider_api_url")
        break
    if calc is None:
        return None
    price = calc.model_price
    flat: list[float | None] = []
    for value in (price.input_mtok, price.output_mtok, price.cache_read_mtok):
        if value is not None and not isinstance(value, Decimal | int | float):
            return _TieredRates(model, provider_url)  # priced by context length
        flat.append(None if value is None else float(value) / _PER_MILLION)
    return ModelRates(input=flat[0] or 0.0, output=flat[1] or 0.0, cached_input=flat[2])


_MAX_CACHED = 10_000
#: The highest rate a prices file may give, USD per 1M tokens.
_MAX_RATE = 1_000_000


class PriceBook:
    """Local prices: user overrides first, then genai-prices; cached per model."""

    def __init__(self, overrides: Mapping[str, ModelRates] | None = None) -> None:
        self._overrides = dict(overrides or {})
        self._cache: dict[tuple[str | None, str], ModelRates | _TieredRates | None] = {}
        self._lock = threading.Lock()
        renew_after_fork(self)

    def rates(self, model: str, provider_url: str | None) -> ModelRates | _TieredRates | None:
        key = (provider_url, model)
        try:
            return self._cache[key]
        except KeyError:
            pass
        found: ModelRates | _TieredRates | None = self._overrides.get(model.lower())
        if found is None:
            try:
                found = _genai_rates(model, provider_url)
            except Exception:
                log.debug("genai-prices lookup failed for %s", model, exc_info=True)
                found = None
        with self._lock:
            # Model names can come from callers (a proxy): keep the cache bounded.
            if len(self._cache) >= _MAX_CACHED:
                self._cache.clear()
            self._cache[key] = found
        return found

    def cost(
        self, usage: Usage | None, models: tuple[str | None, ...], provider_url: str | None
    ) -> float | None:
        """Local cost by the first model that has a price (response model, then request)."""
        if usage is None:
            return None
        for model in models:
            if model:
                rates = self.rates(model, provider_url)
                if rates is not None:
                    cost = rates.cost(usage)
                    # A cost no call can have is not reported (it would swamp sums).
                    ok = cost is not None and 0 <= cost <= MAX_REPORTED_COST_USD
                    return cost if ok else None
        return None


def load_prices() -> None:
    """Import genai-prices and load its data now (it takes ~0.2 s); a failure is logged
    and left for the first lookup to meet."""
    try:
        from genai_prices import Usage as PricesUsage
        from genai_prices import calc_price

        calc_price(PricesUsage(input_tokens=1), "gpt-4o-mini", provider_id="openai")
    except Exception:
        log.debug("could not preload genai-prices", exc_info=True)


def warm_up() -> None:
    """:func:`load_prices` in the background."""
    threading.Thread(target=load_prices, name="tokenlay-prices-warm-up", daemon=True).start()
