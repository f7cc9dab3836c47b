"""Tokenlay rules: load, validate and match (the public ``@tokenlay/rules`` format).

Pure: no I/O beyond reading the rules file, no store access. A rule is::

    {"id": "free-tier", "priority": 1,
     "if": {"plan": "free"},                      # conditions on the request context
     "then": {"model": "gpt-4o-mini",             # fills in a request without a model
              "action": "allow",                  # allow | warn | block | queue
              "limits": [{"type": "requests", "max": 10, "window": "day", "per": "user"}],
              "on_limit_exceeded": {"action": "block", "http_status": 429,
                                    "error_message": "Daily limit reached"}}}
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tokenlay_otel._wire import is_header_text

__all__ = [
    "Limit",
    "OnLimitExceeded",
    "Rule",
    "RulesError",
    "first_match",
    "load_rules",
    "matches",
    "parse_rules",
    "usage_paths",
]

LimitType = Literal["requests", "tokens", "cost", "concurrent"]
Window = Literal["minute", "hour", "day", "month", "year", "total"]
_LIMIT_TYPES = ("requests", "tokens", "cost", "concurrent")
_WINDOWS = ("minute", "hour", "day", "month", "year", "total")
_ACTIONS = ("allow", "block", "warn", "queue")
_ON_LIMIT = ("block", "downgrade", "warn", "queue")
_OPERATORS = frozenset(
    {"gt", "gte", "lt", "lte", "eq", "neq", "in", "nin", "contains", "startsWith", "endsWith"}
)
_LOGICAL = frozenset({"and", "or", "not"})


class RulesError(ValueError):
    """A rules file that cannot be used; the message names the rule and the field."""


# Rule ids and models go back to the caller in x-tokenlay-* response headers.
_HEADER_TEXT_RULE = (
    "must be printable ASCII, without leading or trailing spaces and not over-long "
    "(it is sent back in a response header)"
)


@dataclass(frozen=True, slots=True)
class Limit:
    type: LimitType
    max: float
    window: Window
    per: str
    tracking_key: str | None = None


@dataclass(frozen=True, slots=True)
class OnLimitExceeded:
    action: Literal["block", "downgrade", "warn", "queue"] = "block"
    downgrade_to: str | None = None
    delay_seconds: float | None = None
    retry_after_seconds: float | None = None
    error_code: str | None = None
    error_message: str | None = None
    http_status: int | None = None


@dataclass(frozen=True, slots=True)
class Rule:
    id: str
    condition: Mapping[str, Any]
    priority: float = 0
    model: str | None = None
    action: Literal["allow", "block", "warn", "queue"] = "allow"
    limits: tuple[Limit, ...] = ()
    on_limit_exceeded: OnLimitExceeded | None = None
    description: str | None = None
    custom_fields: Mapping[str, Any] = field(default_factory=dict)


def _check_condition(condition: Any, where: str) -> None:
    if not isinstance(condition, Mapping):
        raise RulesError(f"{where}: a condition must be a mapping, got {condition!r}")
    for key, value in condition.items():
        if key in ("and", "or"):
            if not isinstance(value, list):
                raise RulesError(f"{where}.{key}: must be a list of conditions")
            for i, item in enumerate(value):
                _check_condition(item, f"{where}.{key}[{i}]")
        elif key == "not":
            _check_condition(value, f"{where}.not")
        elif isinstance(value, Mapping):
            unknown = set(value) - _OPERATORS
            if unknown or not value:
                raise RulesError(
                    f"{where}.{key}: unknown operator(s) {sorted(unknown)}; "
                    f"use {', '.join(sorted(_OPERATORS))}"
                )
            for op in ("in", "nin"):
                if op in value and not isinstance(value[op], list):
                    raise RulesError(f"{where}.{key}.{op}: must be a list")
        elif value is not None and not isinstance(value, str | int | float | bool):
            raise RulesError(f"{where}.{key}: unsupported value {value!r}")


def _number(value: Any, where: str, *, positive: bool = True) -> float:
    bad = isinstance(value, bool) or not isinstance(value, int | float)
    if bad or not math.isfinite(value) or (positive and value <= 0):
        raise RulesError(f"{where}: must be a positive number, got {value!r}")
    return float(value)


def _limit(raw: Any, where: str) -> Limit:
    if not isinstance(raw, Mapping):
        raise RulesError(f"{where}: a limit must be a mapping")
    if raw.get("type") not in _LIMIT_TYPES:
        raise RulesError(f"{where}.type: must be one of {', '.join(_LIMIT_TYPES)}")
    if raw.get("window", "total") not in _WINDOWS:
        raise RulesError(f"{where}.window: must be one of {', '.join(_WINDOWS)}")
    per = raw.get("per")
    if not isinstance(per, str) or not per:
        raise RulesError(f"{where}.per: must name a metadata field, e.g. 'user'")
    tracking = raw.get("tracking_key")
    if tracking is not None and not isinstance(tracking, str):
        raise RulesError(f"{where}.tracking_key: must be a string")
    return Limit(
        type=raw["type"],
        max=_number(raw.get("max"), f"{where}.max"),
        window=raw.get("window", "total"),
        per=per,
        tracking_key=tracking,
    )


def _on_limit(raw: Any, where: str) -> OnLimitExceeded:
    if not isinstance(raw, Mapping):
        raise RulesError(f"{where}: must be a mapping")
    action = raw.get("action", "block")
    if action not in _ON_LIMIT:
        raise RulesError(f"{where}.action: must be one of {', '.join(_ON_LIMIT)}")
    if action == "downgrade" and not isinstance(raw.get("downgrade_to"), str):
        raise RulesError(f"{where}.downgrade_to: required (a model name) for 'downgrade'")
    if isinstance(raw.get("downgrade_to"), str) and not is_header_text(raw["downgrade_to"]):
        raise RulesError(f"{where}.downgrade_to: {_HEADER_TEXT_RULE}")
    status = raw.get("http_status")
    if status is not None and (not isinstance(status, int) or not 100 <= status <= 599):
        raise RulesError(f"{where}.http_status: must be an HTTP status code (100-599)")
    delay = raw.get("delay_seconds")
    retry = raw.get("retry_after_seconds")
    return OnLimitExceeded(
        action=action,
        downgrade_to=raw.get("downgrade_to"),
        delay_seconds=None if delay is None else _number(delay, f"{where}.delay_seconds"),
        retry_after_seconds=None
        if retry is None
        else _number(retry, f"{where}.retry_after_seconds"),
        error_code=raw.get("error_code"),
        error_message=raw.get("error_message"),
        http_status=status,
    )


def _rule(raw: Any, index: int) -> Rule:
    rule_id = raw.get("id") if isinstance(raw, Mapping) else None
    where = f"rule {rule_id!r}" if isinstance(rule_id, str) else f"rule #{index + 1}"
    if not isinstance(raw, Mapping):
        raise RulesError(f"{where}: must be a mapping with 'if' and 'then'")
    unknown = set(raw) - {"id", "description", "priority", "if", "then"}
    if unknown:
        raise RulesError(f"{where}: unknown field(s) {sorted(unknown)}")
    if isinstance(rule_id, str) and not is_header_text(rule_id):
        raise RulesError(f"{where}.id: {_HEADER_TEXT_RULE}")
    if "if" not in raw or "then" not in raw:
        raise RulesError(f"{where}: needs both 'if' and 'then'")
    _check_condition(raw["if"], f"{where}.if")
    then = raw["then"]
    if not isinstance(then, Mapping):
        raise RulesError(f"{where}.then: must be a mapping")
    action = then.get("action", "allow")
    if action not in _ACTIONS:
        raise RulesError(f"{where}.then.action: must be one of {', '.join(_ACTIONS)}")
    limits = then.get("limits") or []
    if not isinstance(limits, list):
        raise RulesError(f"{where}.then.limits: must be a list")
    priority = raw.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int | float):
        raise RulesError(f"{where}.priority: must be a number")
    model = then.get("model")
    if model is not None and not isinstance(model, str):
        raise RulesError(f"{where}.then.model: must be a string")
    if model is not None and not is_header_text(model):
        raise RulesError(f"{where}.then.model: {_HEADER_TEXT_RULE}")
    on_limit = then.get("on_limit_exceeded")
    parsed = tuple(_limit(item, f"{where}.then.limits[{i}]") for i, item in enumerate(limits))
    counted = [(lim.type, lim.window, lim.tracking_key or lim.per) for lim in parsed]
    if len(set(counted)) < len(counted):
        # They would share one counter in the store and take it twice.
        raise RulesError(
            f"{where}.then.limits: two limits of the same type and window per the same field"
        )
    return Rule(
        id=rule_id if isinstance(rule_id, str) else f"rule-{index + 1}",
        condition=raw["if"],
        priority=priority,
        model=model,
        action=action,
        limits=parsed,
        on_limit_exceeded=None
        if on_limit is None
        else _on_limit(on_limit, f"{where}.then.on_limit_exceeded"),
        description=raw.get("description"),
        custom_fields=then.get("custom_fields") or {},
    )


def parse_rules(data: Any) -> list[Rule]:
    """Validate rules given as ``{"rules": [...]}`` or a bare list; highest priority first."""
    items = data.get("rules") if isinstance(data, Mapping) else data
    if not isinstance(items, list):
        raise RulesError("rules: expected a list of rules, or a mapping with a 'rules' list")
    rules = [_rule(item, i) for i, item in enumerate(items)]
    seen: set[str] = set()
    for rule in rules:
        if rule.id in seen:
            raise RulesError(f"rule {rule.id!r}: the id is used twice")
        seen.add(rule.id)
    # Stable sort: equal priorities keep file order.
    return sorted(rules, key=lambda r: -r.priority)


def load_rules(path: str | Path) -> list[Rule]:
    """Read a YAML or JSON rules file. Raises :class:`RulesError` naming file and field."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
        if file.suffix.lower() in (".yaml", ".yml"):
            import yaml  # type: ignore[import-untyped,import-not-found]

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
        return parse_rules(data)
    except RulesError as exc:
        raise RulesError(f"{file}: {exc}") from None
    except (OSError, ValueError) as exc:
        raise RulesError(f"{file}: cannot read the rules: {exc}") from None
    except Exception as exc:  # yaml.YAMLError
        raise RulesError(f"{file}: not valid YAML: {exc}") from None


def _lookup(context: Mapping[str, Any], path: str) -> Any:
    if path in context:
        return context[path]
    value: Any = context
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _coerce(value: Any, like: Any) -> Any:
    """Metadata arrives as text: compare "5" with 5 and "true" with True sensibly."""
    if isinstance(value, str) and not isinstance(like, str):
        if isinstance(like, bool):
            return value.lower() == "true" if value.lower() in ("true", "false") else value
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _holds(op: str, value: Any, target: Any) -> bool:
    if op in ("in", "nin"):
        found = _coerce(value, (target or [""])[0]) in target
        return found if op == "in" else not found
    value = _coerce(value, target)
    if op == "eq":
        return bool(value == target)
    if op == "neq":
        return bool(value != target)
    if op in ("contains", "startsWith", "endsWith"):
        if not isinstance(value, str):
            return False
        if op == "contains":
            return target in value
        return value.startswith(target) if op == "startsWith" else value.endswith(target)
    if value is None:
        return False
    try:
        if op == "gt":
            return bool(value > target)
        if op == "gte":
            return bool(value >= target)
        if op == "lt":
            return bool(value < target)
        return bool(value <= target)  # lte
    except TypeError:  # e.g. "abc" > 5
        return False


def _compare(value: Any, ops: Mapping[str, Any]) -> bool:
    return all(_holds(op, value, target) for op, target in ops.items())


def matches(condition: Mapping[str, Any], context: Mapping[str, Any]) -> bool:
    """Whether ``context`` satisfies ``condition`` (every key must hold)."""
    for key, expected in condition.items():
        if key == "and":
            ok = all(matches(c, context) for c in expected)
        elif key == "or":
            ok = any(matches(c, context) for c in expected)
        elif key == "not":
            ok = not matches(expected, context)
        else:
            value = _lookup(context, key)
            if isinstance(expected, Mapping):
                ok = _compare(value, expected)
            else:
                ok = _coerce(value, expected) == expected
        if not ok:
            return False
    return True


def first_match(rules: Sequence[Rule], context: Mapping[str, Any]) -> Rule | None:
    """The highest-priority rule whose condition holds (rules come sorted)."""
    for rule in rules:
        if matches(rule.condition, context):
            return rule
    return None


def usage_paths(rules: Sequence[Rule]) -> frozenset[str]:
    """The ``usage.*`` context paths the conditions read, to fetch only those."""
    found: set[str] = set()

    def walk(condition: Mapping[str, Any]) -> None:
        for key, value in condition.items():
            if key in ("and", "or"):
                for item in value:
                    walk(item)
            elif key == "not":
                walk(value)
            elif key.startswith("usage."):
                found.add(key)

    for rule in rules:
        walk(rule.condition)
    return frozenset(found)
