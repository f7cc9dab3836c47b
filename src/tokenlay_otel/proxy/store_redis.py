"""The shared store: counters and leases in Redis, each step one Lua script, so several
proxies on one Redis keep every limit exact."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .store import LEASE_GRACE_S, Adjustment, Hold, UsageStore

__all__ = ["RedisStore"]

# KEYS: one per hold. ARGV: force, lease_id, lease_s, then per hold amount, maximum,
# ttl (0: none), lease (1/0). Checks every hold before taking any. Leases run by Redis's
# clock, so proxies with skewed clocks cannot expire each other's.
_ADMIT = """
local force = ARGV[1] == '1'
local time = redis.call('TIME')
local now = tonumber(time[1]) + tonumber(time[2]) / 1000000
local lease_until = now + tonumber(ARGV[3])
local values = {}
for i, key in ipairs(KEYS) do
  local at = 3 + (i - 1) * 4
  if ARGV[at + 4] == '1' then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    values[i] = redis.call('ZCARD', key)
  else
    values[i] = tonumber(redis.call('GET', key) or '0')
  end
  local amount, maximum = tonumber(ARGV[at + 1]), tonumber(ARGV[at + 2])
  if not force and (values[i] >= maximum or values[i] + amount > maximum) then
    local out = {i - 1}
    for j = 1, #values do out[j + 1] = tostring(values[j]) end
    return out
  end
end
local out = {-1}
for i, key in ipairs(KEYS) do
  local at = 3 + (i - 1) * 4
  if ARGV[at + 4] == '1' then
    redis.call('ZADD', key, lease_until, ARGV[2])
    redis.call('EXPIREAT', key, math.ceil(lease_until) + GRACE)
    out[i + 1] = tostring(values[i] + 1)
  else
    out[i + 1] = redis.call('INCRBYFLOAT', key, ARGV[at + 1])
    local ttl = tonumber(ARGV[at + 3])
    if ttl > 0 then redis.call('EXPIRE', key, ttl) end
  end
end
return out
""".replace("GRACE", str(LEASE_GRACE_S))

# KEYS: the adjusted counters, then the leases. ARGV: count of adjustments, lease_id,
# then per adjustment amount, ttl (0: none).
_SETTLE = """
local n = tonumber(ARGV[1])
for i = 1, n do
  local key, amount, ttl = KEYS[i], ARGV[1 + 2 * i], tonumber(ARGV[2 + 2 * i])
  local value = tonumber(redis.call('INCRBYFLOAT', key, amount))
  if value < 0 then redis.call('SET', key, '0', 'KEEPTTL') end
  if ttl > 0 and redis.call('TTL', key) < 0 then redis.call('EXPIRE', key, ttl) end
end
for i = n + 1, #KEYS do redis.call('ZREM', KEYS[i], ARGV[2]) end
return 1
"""


# KEYS: the leases' keys. ARGV: lease_s, then each lease's id. Only live leases move.
_RENEW = """
local time = redis.call('TIME')
local expiry = tonumber(time[1]) + tonumber(time[2]) / 1000000 + tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  if redis.call('ZADD', key, 'XX', 'CH', expiry, ARGV[i + 1]) > 0 then
    redis.call('EXPIREAT', key, math.ceil(expiry) + GRACE)
  end
end
return 1
""".replace("GRACE", str(LEASE_GRACE_S))


class RedisStore(UsageStore):
    """Counters in Redis, updated by Lua scripts: shared, exact limits across proxies."""

    def __init__(self, url: str, *, prefix: str = "tokenlay:") -> None:
        import redis.asyncio as aioredis

        self._redis: Any = aioredis.from_url(url)
        self._prefix = prefix
        self._admit = self._redis.register_script(_ADMIT)
        self._settle = self._redis.register_script(_SETTLE)
        self._renew = self._redis.register_script(_RENEW)

    async def get_many(self, keys: Sequence[str]) -> list[float]:
        if not keys:
            return []
        values = await self._redis.mget([self._prefix + k for k in keys])
        return [float(v) if v is not None else 0.0 for v in values]

    async def admit(
        self, holds: Sequence[Hold], lease_id: str, lease_s: float, *, force: bool = False
    ) -> tuple[int, list[float]]:
        if not holds:
            return -1, []
        args: list[Any] = ["1" if force else "0", lease_id, repr(float(lease_s))]
        for hold in holds:
            args += [repr(hold.amount), repr(hold.maximum), hold.ttl_s or 0, int(hold.lease)]
        index, *values = await self._admit(keys=[self._prefix + h.key for h in holds], args=args)
        return int(index), [float(v) for v in values]

    async def settle(
        self, adjustments: Sequence[Adjustment], leases: Sequence[str], lease_id: str
    ) -> None:
        if not adjustments and not leases:
            return
        args: list[Any] = [len(adjustments), lease_id]
        for _, amount, ttl_s in adjustments:
            args += [repr(amount), ttl_s or 0]
        keys = [self._prefix + key for key, _, _ in adjustments]
        await self._settle(keys=keys + [self._prefix + k for k in leases], args=args)

    async def largest(
        self, prefix: str, suffix: str, *, lease: bool, count: int
    ) -> list[tuple[str, float]]:
        # SCAN walks the keyspace in steps (it never blocks Redis the way KEYS does);
        # run at metric collection, not per call.
        pattern = _glob_escape(self._prefix + prefix) + "*" + _glob_escape(suffix)
        keys = [k async for k in self._redis.scan_iter(match=pattern, count=1000)]
        if not keys:
            return []
        if lease:
            now = await self._redis.time()
            async with self._redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.zcount(key, f"({now[0] + now[1] / 1e6}", "+inf")
                values = await pipe.execute()
        else:
            values = await self._redis.mget(keys)
        skip = len(self._prefix)
        found = [
            (key.decode()[skip:], float(value))
            for key, value in zip(keys, values, strict=True)
            if value is not None and float(value) > 0
        ]
        found.sort(key=lambda item: (-item[1], item[0]))
        return found[:count]

    async def renew(self, leases: Sequence[tuple[str, str]], lease_s: float) -> None:
        if leases:
            keys = [self._prefix + key for key, _ in leases]
            await self._renew(keys=keys, args=[repr(float(lease_s)), *(i for _, i in leases)])

    async def close(self) -> None:
        await self._redis.aclose()


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
