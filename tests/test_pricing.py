"""Local prices as plain data: rates, the prices file, the price book's choices.

No server and no SDK: what a call costs is arithmetic on its usage, checked by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tokenlay_otel._attributes import Usage
from tokenlay_otel._pricing import ModelRates, PriceBook, load_price_overrides
from tokenlay_otel._wire import MAX_REPORTED_COST_USD

GEMINI = "https://generativelanguage.googleapis.com/v1beta/openai/"

# --- one model's rates -----------------------------------------------------------------


def test_input_and_output_tokens_at_their_rates() -> None:
    rates = ModelRates(input=2e-6, output=8e-6)
    assert rates.cost(Usage(input_tokens=100, output_tokens=10)) == pytest.approx(
        100 * 2e-6 + 10 * 8e-6
    )


def test_cached_input_tokens_at_the_cached_rate_the_rest_at_the_input_rate() -> None:
    rates = ModelRates(input=2e-6, output=8e-6, cached_input=0.5e-6)
    usage = Usage(input_tokens=100, output_tokens=0, cached_input_tokens=40)
    assert rates.cost(usage) == pytest.approx(60 * 2e-6 + 40 * 0.5e-6)


def test_without_a_cached_rate_cached_tokens_cost_the_input_rate() -> None:
    rates = ModelRates(input=2e-6, output=8e-6)
    usage = Usage(input_tokens=100, output_tokens=0, cached_input_tokens=40)
    assert rates.cost(usage) == pytest.approx(100 * 2e-6)


def test_more_cached_tokens_than_input_tokens_are_capped_at_the_input() -> None:
    # An answer's counts need not agree; the cost is never below zero.
    rates = ModelRates(input=2e-6, output=8e-6, cached_input=0.5e-6)
    usage = Usage(input_tokens=10, output_tokens=0, cached_input_tokens=50)
    assert rates.cost(usage) == pytest.approx(10 * 0.5e-6)


def test_reasoning_tokens_are_not_billed_twice() -> None:
    # They are part of the output tokens already.
    rates = ModelRates(input=1e-6, output=4e-6)
    usage = Usage(input_tokens=10, output_tokens=100, reasoning_tokens=80)
    assert rates.cost(usage) == pytest.approx(10 * 1e-6 + 100 * 4e-6)


def test_one_count_alone_is_priced_and_none_is_no_cost() -> None:
    rates = ModelRates(input=1e-6, output=4e-6)
    assert rates.cost(Usage(output_tokens=5)) == pytest.approx(5 * 4e-6)
    assert rates.cost(Usage(input_tokens=5)) == pytest.approx(5 * 1e-6)
    assert rates.cost(Usage(cached_input_tokens=5)) is None
    assert rates.cost(Usage()) is None


# --- the prices file -------------------------------------------------------------------


def _file(tmp_path: Path, data: object, name: str = "prices.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data) if name.endswith(".json") else str(data))
    return path


def test_a_prices_file_is_per_million_tokens_by_lower_case_model(tmp_path: Path) -> None:
    path = _file(
        tmp_path, {"House-Model": {"input": 3, "output": 12.5, "cached": 0.3}, "m2": {
            "input": 0, "output": 1}}
    )  # fmt: skip
    assert load_price_overrides(path) == {
        "house-model": ModelRates(input=3e-6, output=12.5e-6, cached_input=0.3e-6),
        "m2": ModelRates(input=0.0, output=1e-6, cached_input=None),
    }


def test_yaml_prices_read_like_json(tmp_path: Path) -> None:
    path = _file(tmp_path, "m:\n  input: 1\n  output: 2\n", name="prices.yml")
    assert load_price_overrides(str(path)) == {"m": ModelRates(input=1e-6, output=2e-6)}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"m": {"input": True, "output": 1}}, r"model 'm': 'input' must be a number"),
        ({"m": {"input": 1, "output": "2"}}, r"model 'm': 'output' must be a number"),
        ({"m": {"input": 1, "output": 1, "cached": -0.5}}, r"'cached' must be a number"),
        ({"m": {"input": 1_000_001, "output": 1}}, r"from 0 to 1e\+06"),
        ({"m": [1, 2]}, r"model 'm': expected \{input, output, cached\}"),
        ({"m": {"output": 1}}, r"'input' and 'output' are required"),
    ],
)
def test_a_wrong_entry_is_named_with_the_file(tmp_path: Path, data: object, message: str) -> None:
    path = _file(tmp_path, data)
    with pytest.raises(ValueError, match=message) as info:
        load_price_overrides(path)
    assert str(info.value).startswith(str(path))


def test_a_missing_file_and_broken_yaml_are_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read the prices file"):
        load_price_overrides(tmp_path / "absent.json")
    broken = _file(tmp_path, "m: [unclosed\n", name="prices.yaml")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_price_overrides(broken)


# --- the price book --------------------------------------------------------------------


def test_an_override_wins_over_the_bundled_price_whatever_the_case() -> None:
    book = PriceBook({"gpt-4o-mini": ModelRates(input=1e-6, output=2e-6)})
    usage = Usage(input_tokens=10, output_tokens=5)
    assert book.cost(usage, ("GPT-4o-mini",), "https://api.openai.com/v1") == pytest.approx(
        10 * 1e-6 + 5 * 2e-6
    )
    # Without it, genai-prices' bundled price ($0.15 / $0.60 per 1M).
    assert PriceBook().cost(usage, ("gpt-4o-mini",), "https://api.openai.com/v1") == (
        pytest.approx(10 * 0.15e-6 + 5 * 0.6e-6)
    )


def test_the_first_model_with_a_price_is_used() -> None:
    book = PriceBook({"known": ModelRates(input=1e-6, output=1e-6)})
    usage = Usage(input_tokens=3, output_tokens=4)
    # The response model first; one nobody prices, or none at all, falls to the next.
    assert book.cost(usage, (None, "", "no-such-model-zz", "known"), None) == pytest.approx(7e-6)
    assert book.cost(usage, ("no-such-model-zz",), None) is None
    assert book.cost(None, ("known",), None) is None


def test_a_cost_no_call_can_have_is_not_reported() -> None:
    book = PriceBook({"dear": ModelRates(input=1.0, output=1.0)})
    huge = int(MAX_REPORTED_COST_USD) + 1
    assert book.cost(Usage(input_tokens=huge), ("dear",), None) is None
    assert book.cost(Usage(input_tokens=5), ("dear",), None) == 5.0


def test_rates_are_looked_up_once_per_provider_and_model() -> None:
    book = PriceBook()
    first = book.rates("gpt-4o-mini", "https://api.openai.com/v1")
    assert first is not None
    assert book.rates("gpt-4o-mini", "https://api.openai.com/v1") is first
    assert book.rates("no-such-model-zz", None) is None


def test_an_unknown_host_is_priced_by_the_model_name() -> None:
    # A proxy or a local OpenAI-compatible server: the model's own price.
    book = PriceBook()
    usage = Usage(input_tokens=1000, output_tokens=100)
    here = book.cost(usage, ("gpt-4o-mini",), "http://127.0.0.1:8787/v1")
    assert here == pytest.approx(1000 * 0.15e-6 + 100 * 0.6e-6)


def test_a_model_priced_by_the_size_of_the_call_is_priced_per_call() -> None:
    # gemini-2.5-pro: input $1.25 per 1M up to 200k tokens of prompt, $2.50 past it.
    book = PriceBook()
    small = book.cost(Usage(input_tokens=1000, output_tokens=100), ("gemini-2.5-pro",), GEMINI)
    large = book.cost(Usage(input_tokens=300_000, output_tokens=100), ("gemini-2.5-pro",), GEMINI)
    assert small == pytest.approx(1000 * 1.25e-6 + 100 * 10e-6)
    assert large == pytest.approx(300_000 * 2.5e-6 + 100 * 15e-6)
