"""Per-producer sequence ledger: each (producer id, seq) is stored once.

A producer's state is its highest sequence seen (`max_seq`) and the holes below
it: ranges of sequences not yet stored. A message is new when its seq is above
`max_seq` or inside a hole; anything else is a retransmission and is skipped.
`contiguous_seq` (every seq up to it is stored) is what acknowledgements report.

The state is saved in the `producers` table in the same transaction as the
rows it describes, so after a crash it matches what was committed. Memory is
bounded: at most `max_cached` states are kept (least recently used clean ones
are dropped and reloaded on demand), and at most `max_holes` hole ranges per
producer (the oldest are abandoned and counted; a retransmission that arrives
after its hole was abandoned is treated as a duplicate).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

MAX_HOLES = 1000


@dataclass
class ProducerState:
    producer_id: str
    max_seq: int = 0
    holes: list[list[int]] = field(default_factory=list)  # sorted [first, last] ranges
    gaps: int = 0            # holes opened (jumps forward in seq)
    abandoned: int = 0       # sequences given up on when max_holes was exceeded
    duplicates: int = 0
    first_seen_ns: int = 0
    last_seen_ns: int = 0

    @property
    def contiguous_seq(self) -> int:
        return self.holes[0][0] - 1 if self.holes else self.max_seq

    @property
    def missing(self) -> int:
        return sum(last - first + 1 for first, last in self.holes)

    def accept(self, seq: int, max_holes: int) -> bool:
        """Record `seq`; False if it was already stored (or given up on)."""
        if seq > self.max_seq:
            if seq > self.max_seq + 1:
                self.holes.append([self.max_seq + 1, seq - 1])
                self.gaps += 1
                if len(self.holes) > max_holes:
                    first, last = self.holes.pop(0)
                    self.abandoned += last - first + 1
            self.max_seq = seq
            return True
        for i, (first, last) in enumerate(self.holes):
            if seq < first:
                break
            if seq <= last:
                if first == last:
                    del self.holes[i]
                elif seq == first:
                    self.holes[i][0] = seq + 1
                elif seq == last:
                    self.holes[i][1] = seq - 1
                else:
                    self.holes[i:i + 1] = [[first, seq - 1], [seq + 1, last]]
                return True
        self.duplicates += 1
        return False

    def row(self) -> tuple[Any, ...]:
        return (self.producer_id, self.contiguous_seq, self.max_seq,
                msgpack.packb(self.holes) if self.holes else None, self.gaps, self.abandoned,
                self.duplicates, self.first_seen_ns, self.last_seen_ns)

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> ProducerState:
        (producer_id, _contiguous, max_seq, holes, gaps, abandoned, duplicates,
         first_seen_ns, last_seen_ns) = row
        return cls(producer_id, max_seq, msgpack.unpackb(holes) if holes else [], gaps,
                   abandoned, duplicates, first_seen_ns, last_seen_ns)

    def summary(self) -> dict[str, Any]:
        return {"producer": self.producer_id, "contiguous_seq": self.contiguous_seq,
                "max_seq": self.max_seq, "missing": self.missing, "gaps": self.gaps,
                "abandoned": self.abandoned, "duplicates": self.duplicates}


class ProducerLedger:
    def __init__(self, load: Callable[[str], tuple[Any, ...] | None], max_cached: int = 10_000,
                 max_holes: int = MAX_HOLES) -> None:
        self._load = load
        self.max_cached = max_cached
        self.max_holes = max_holes
        self._states: OrderedDict[str, ProducerState] = OrderedDict()
        self._dirty: dict[str, ProducerState] = {}
        self.duplicates = 0

    def accept(self, producer_id: str, seq: int, now_ns: int) -> bool:
        """True if (producer_id, seq) is new and its message must be stored."""
        state = self._states.get(producer_id)
        if state is None:
            state = self._fetch(producer_id, now_ns)
        else:
            self._states.move_to_end(producer_id)
        state.last_seen_ns = now_ns
        self._dirty[producer_id] = state
        if state.accept(seq, self.max_holes):
            return True
        self.duplicates += 1
        return False

    def _fetch(self, producer_id: str, now_ns: int) -> ProducerState:
        row = self._load(producer_id)
        state = ProducerState.from_row(row) if row else \
            ProducerState(producer_id, first_seen_ns=now_ns)
        self._states[producer_id] = state
        if len(self._states) > self.max_cached:
            # The least recently used clean state; dirty ones wait for their commit.
            victim = next((pid for pid in self._states if pid not in self._dirty), None)
            if victim is not None:
                del self._states[victim]
        return state

    @property
    def dirty(self) -> bool:
        return bool(self._dirty)

    def dirty_rows(self) -> list[tuple[Any, ...]]:
        """Rows for the producers table, to commit with the current batch."""
        return [state.row() for state in self._dirty.values()]

    def committed(self) -> list[ProducerState]:
        """The states just committed, now clean."""
        states = list(self._dirty.values())
        self._dirty.clear()
        return states

    def snapshot(self, limit: int = 20) -> dict[str, Any]:
        with_holes = [s for s in self._states.values() if s.holes]
        with_holes.sort(key=lambda s: s.missing, reverse=True)
        return {"cached": len(self._states), "duplicates_skipped": self.duplicates,
                "with_missing": len(with_holes),
                "missing": [s.summary() for s in with_holes[:limit]]}
