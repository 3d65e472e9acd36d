"""Redis command packing in C (hiredis) for redis-py's asyncio connections.

redis-py's asyncio ``Connection.pack_command`` is pure Python: one ``Encoder.encode``
call and one bytes join per argument. A step's commit is one EVALSHA with some twenty
arguments (artifact, cache entry, events, trace), and the packing was the largest
single cost a worker paid per step. ``hiredis.pack_command`` writes the same RESP
bytes (numbers as ``repr``, text as UTF-8) in one C call.
"""

from __future__ import annotations

from typing import Any

import hiredis
from redis.asyncio.connection import AbstractConnection


class HiredisPacking:
    """Mixin over a redis-py connection class: pack with hiredis, and leave what it
    cannot take (multi-word command names, memoryviews, booleans) to redis-py."""

    def pack_command(self, *args: Any) -> list[bytes]:
        name = args[0]
        if not (isinstance(name, str) and " " in name):
            try:
                return [hiredis.pack_command(args)]
            except TypeError:
                pass
        return super().pack_command(*args)  # type: ignore[misc,no-any-return]


def with_hiredis_packing(connection_class: type[AbstractConnection]) -> type[AbstractConnection]:
    """``connection_class`` (plain, TLS or Unix socket, as the URL chose) packing with hiredis."""
    if issubclass(connection_class, HiredisPacking):
        return connection_class
    return type(f"Hiredis{connection_class.__name__}", (HiredisPacking, connection_class), {})
