"""Taking a message off a Redis queue and recording it as held, in one Redis step.

kombu pops with BRPOP and records the message in `unacked` with a second command: a worker
killed between the two loses the message, since nothing records it anywhere. Here one Lua
script moves the tail item of the first non-empty queue into kombu's own bookkeeping (the
`unacked` hash and its `unacked_index`, so kombu's ack, reject, visibility-timeout restore and
workers of the previous version all keep working) and into the taker's `held` set, under a lease
the taker keeps alive. A kill at any instant leaves the item either in its queue or recorded;
when a lease lapses, any live worker puts its held messages back on their queues.

Scripts cannot block, so an idle worker waits on each of its queues with `BLMOVE q q RIGHT RIGHT`
(one connection per queue), which blocks until the queue holds an item and then moves nothing (the
tail goes back to the tail): a wait that takes nothing. Whichever wait returns first, it takes.

The script never decodes what it moves (a hostile item costs Redis nothing but a copy); it
records the item under a fresh delivery tag, with the queue it came from as its routing key, so a
restore puts it back where it was taken from, whatever its envelope claims. Every write comes
before the pop: a Redis at its `maxmemory` refuses the first write and the queue is left as it was.
A bookkeeping key or queue holding another type (anyone can `SET unacked x`) would fail every take
on every worker: the script renames it aside (`<key>.misplaced.<ms>`) and reports it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

HELD_PREFIX = "rerank.held."
LEASES = "rerank.leases"
QUARANTINE = "rerank.quarantine"
QUARANTINE_ENTRIES = 1000
QUARANTINE_ITEM_BYTES = 65_536

TAKE = """
local unacked, index, leases, held = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local tag, lease, lease_ms = ARGV[1], ARGV[2], tonumber(ARGV[3])
local clock = redis.call('TIME')
local now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local moved = {}
local function fits(key, kind)
  local found = redis.call('TYPE', key)['ok']
  if found == 'none' or found == kind then return true end
  local aside = key .. '.misplaced.' .. now_ms
  redis.call('RENAME', key, aside)
  moved[#moved + 1] = key .. ' (a ' .. found .. ', moved to ' .. aside .. ')'
  return false
end
fits(unacked, 'hash'); fits(index, 'zset'); fits(leases, 'zset'); fits(held, 'set')
for i = 5, #KEYS do
  local queue = KEYS[i]
  if fits(queue, 'list') then
    local item = redis.call('LINDEX', queue, -1)
    if item then
      redis.call('ZADD', leases, now_ms + lease_ms, lease)
      redis.call('SADD', held, tag)
      redis.call('ZADD', index, string.format('%.6f', now_ms / 1000), tag)
      redis.call('HSET', unacked, tag, '[' .. item .. ',"",' .. cjson.encode(ARGV[i]) .. ']')
      redis.call('RPOP', queue)
      return {i - 4, item, unpack(moved)}
    end
  end
end
return {0, false, unpack(moved)}
"""
"""KEYS: unacked, unacked_index, leases, this lease's held set, then the queue keys in the order to try.
ARGV: the delivery tag to record, the lease, its lifetime in ms, then (from ARGV[5]) each queue key's queue name.
Returns {position of the queue key taken from (0: none), the item, misplaced keys moved aside...}."""

KEEP = """
local clock = redis.call('TIME')
local now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local found = redis.call('TYPE', KEYS[1])['ok']
if found ~= 'none' and found ~= 'zset' then redis.call('RENAME', KEYS[1], KEYS[1] .. '.misplaced.' .. now_ms) end
redis.call('ZADD', KEYS[1], now_ms + tonumber(ARGV[2]), ARGV[1])
local lapsed, holding = redis.call('ZRANGE', KEYS[1], '-inf', now_ms, 'BYSCORE', 'LIMIT', 0, tonumber(ARGV[4])), {}
for _, lease in ipairs(lapsed) do
  if #holding < tonumber(ARGV[3]) and redis.call('EXISTS', ARGV[5] .. lease) == 1 then
    holding[#holding + 1] = lease
  elseif redis.call('EXISTS', ARGV[5] .. lease) == 0 then
    redis.call('ZREM', KEYS[1], lease)
  end
end
return holding
"""
"""KEYS: leases. ARGV: this lease, its lifetime in ms, how many lapsed leases that hold messages to return, how many
lapsed entries to look at, the held sets' key prefix. Renews this lease (moving a leases key of another type aside),
forgets looked-at lapsed leases that hold nothing, and returns up to the asked number that do: forged entries cost one
look each, and cannot keep a dead worker's lease from being found."""


ASIDE = """
local moved = {}
for i, key in ipairs(KEYS) do
  local found = redis.call('TYPE', key)['ok']
  if found ~= 'none' and found ~= ARGV[i + 1] then
    local aside = key .. '.misplaced.' .. ARGV[1]
    redis.call('RENAME', key, aside)
    moved[#moved + 1] = key .. ' (a ' .. found .. ', moved to ' .. aside .. ')'
  end
end
return moved
"""
"""KEYS: keys that must hold their type or nothing. ARGV: a timestamp, then the Redis type each key must hold.
Renames every key of another type aside (`<key>.misplaced.<ms>`) and returns what it moved."""

UNEXPIRING_ASIDE = """
if redis.call('TTL', KEYS[1]) == -1 then return redis.call('RENAME', KEYS[1], KEYS[1] .. '.misplaced.' .. ARGV[1]) end
"""


@dataclass(frozen=True)
class Taken:
    """What one take returned: the queue it came from (None: nothing waiting), the raw item, keys moved aside."""

    queue: str | None
    item: bytes | None
    misplaced: tuple[str, ...]


def take_call(keys: list[str], queues: list[str], bookkeeping: list[str], tag: str, lease: str, lease_ms: int) -> list[Any]:
    """The EVAL command (as arguments) that takes from the first non-empty key of `keys`; `queues[i]` names `keys[i]`'s queue."""
    return ["EVAL", TAKE, len(bookkeeping) + len(keys), *bookkeeping, *keys, tag, lease, lease_ms, "", *queues]


def parse_taken(reply: Any, queues: list[str]) -> Taken:
    """Read the script's reply; anything else than its own shape means nothing was taken."""
    if not isinstance(reply, (list, tuple)) or len(reply) < 2:
        return Taken(None, None, ())
    position, item, *misplaced = reply
    moved = tuple(m.decode(errors="replace") if isinstance(m, bytes) else str(m) for m in misplaced)
    if not isinstance(position, int) or not 1 <= position <= len(queues) or not isinstance(item, bytes):
        return Taken(None, None, moved)
    return Taken(queues[position - 1], item, moved)


def quarantine_entry(item: bytes | str, queue: str | None, reason: str, at: float) -> str:
    """What is kept of a refused item for an operator to inspect: why, where from, and its first 64 KiB."""
    raw = item.encode() if isinstance(item, str) else item
    return json.dumps(
        {
            "reason": reason,
            "queue": queue,
            "at": at,
            "bytes": len(raw),
            "item": raw[:QUARANTINE_ITEM_BYTES].decode(errors="replace"),
        }
    )
