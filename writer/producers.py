"""Producer sessions: each (producer id, seq) is stored once, and a restarted
producer never loses a message.

A producer opens a session with `producer_open` (the writer's control
endpoint) and is handed the next epoch and the seq to continue from. Its
messages carry (producer, epoch, seq). The writer keeps, per producer, the
current epoch, the highest seq seen (`max_seq`) and the holes below it: a
message of the current epoch is new when its seq is above `max_seq` or inside
a hole, and a retransmission otherwise. A message of an older epoch is refused
(`producer_fenced`: a newer incarnation took over), one of an epoch never
handed out is refused (`unknown_session`), and so is one whose seq is more
than MAX_SEQ_AHEAD above `max_seq` (`seq_out_of_window`, not decided).
Opening a session gives up the previous session's holes (counted in
`abandoned`): nobody is left to re-send them, and sequence numbers go on from
`max_seq + 1`, so (producer, seq) stays unique across restarts.

A message of the current epoch that the writer refuses (too large, bad meta,
...) is *decided*: its seq leaves the holes like a stored one, so
`contiguous_seq` (every seq up to it is stored or refused) passes it, and the
refusal is remembered (the last MAX_REFUSALS of the session) for a producer
that missed the nack. Acknowledgements carry `refused`, the session's count.

The state is saved in the `producers` table in the same transaction as the
rows it describes, so after a crash it matches what was committed; an open is
committed before it is answered. Memory is bounded: at most `max_cached`
states are kept (least recently used clean ones are dropped and reloaded on
demand), and at most `max_holes` hole ranges and MAX_REFUSALS refusals per
producer.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

from bus import protocol
from storage.messages import MessageRow

MAX_HOLES = 1000
# Refusals of the current session kept for producers that missed their nack.
MAX_REFUSALS = 256
# A seq further than this above the highest one seen is refused and not decided
# (seq_out_of_window): one message must not open a hole no one will fill, nor
# push the sequence to the end of its 63 bits. A Publisher keeps at most
# 100,000 messages in flight.
MAX_SEQ_AHEAD = 1_000_000

# A session message's frames, which its mac covers: [topic, payload, meta],
# see protocol.SessionMac.
Signed = Sequence[bytes]


class NotAuthentic(Exception):
    """A message of a producer's current session without the mac of its session
    key: someone without the key sent it. Dropped, never nacked (a nack would
    decide the real message's seq)."""


@dataclass
class ProducerState:
    producer_id: str
    max_seq: int = 0
    holes: list[list[int]] = field(default_factory=list)  # sorted [first, last] ranges
    gaps: int = 0            # holes opened (jumps forward in seq)
    abandoned: int = 0       # seqs given up on: too many holes, or left by an ended session
    duplicates: int = 0
    first_seen_ns: int = 0
    last_seen_ns: int = 0
    epoch: int = 0           # the current session; 0: none opened yet
    refused: int = 0         # seqs of this session refused (decided, not stored)
    refusals: list[list[Any]] = field(default_factory=list)  # [[seq, code], ...], newest last
    owner: str | None = None  # (CURVE) the public key that opened it first
    # The current session's MAC key: stored in producer_keys, apart from the
    # rest of the state, which a database reader may see.
    session_key: bytes | None = field(default=None, repr=False)  # never in a log line
    _signer: protocol.SessionMac | None = field(default=None, repr=False, compare=False)

    @property
    def contiguous_seq(self) -> int:
        return self.holes[0][0] - 1 if self.holes else self.max_seq

    @property
    def missing(self) -> int:
        return sum(last - first + 1 for first, last in self.holes)

    def accept(self, seq: int, max_holes: int) -> bool:
        """Record `seq`; False if it was already decided (or given up on)."""
        if seq == self.max_seq + 1:  # the usual case, on the writer's hot path
            self.max_seq = seq
            return True
        if self._decide(seq, max_holes):
            return True
        self.duplicates += 1
        return False

    def _decide(self, seq: int, max_holes: int) -> bool:
        """Take `seq` out of what is still to come; False if it was not."""
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
        return False

    @property
    def signer(self) -> protocol.SessionMac | None:
        """The current session's MAC (None for a session an older bus opened
        without a key: none of its messages is authentic)."""
        if self._signer is None and self.session_key is not None:
            self._signer = protocol.SessionMac(self.session_key)  # once per session
        return self._signer

    def authentic(self, signed: Signed) -> bool:
        """Does this message of the current session carry its session key's mac?"""
        signer = self.signer
        return signer is not None and signer.message_is_authentic(*signed)

    def refusal_of(self, seq: int) -> str | None:
        """The code `seq` was refused with, if it is among the remembered refusals."""
        return next((code for refused_seq, code in self.refusals if refused_seq == seq), None)

    def refuse(self, seq: int, code: str, max_holes: int) -> str | None:
        """Decide `seq` as refused with `code`; returns the code to tell the
        producer, or None if `seq` was stored before (a retransmission)."""
        if not self.accept(seq, max_holes):  # a retransmission: refused, or stored, before
            return self.refusal_of(seq)
        self.refused += 1
        self.refusals.append([seq, code])
        del self.refusals[:-MAX_REFUSALS]
        return code

    def open_session(self) -> None:
        """A new incarnation: the next epoch, the previous session's holes given up."""
        self.epoch += 1
        self.abandoned += self.missing
        self.holes = []
        self.refused = 0
        self.refusals = []

    def row(self, with_key: bool = False) -> tuple[Any, ...]:
        """The producers row, then the session key to store (with_key: a
        session just opened) or None (storage.sessions.write_producers)."""
        return (self.producer_id, self.contiguous_seq, self.max_seq,
                msgpack.packb(self.holes) if self.holes else None, self.gaps, self.abandoned,
                self.duplicates, self.first_seen_ns, self.last_seen_ns, self.epoch, self.refused,
                msgpack.packb(self.refusals) if self.refusals else None, self.owner,
                self.session_key if with_key else None)

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> ProducerState:
        """From a producers row and its producer_keys row's key (None if none)."""
        (producer_id, _contiguous, max_seq, holes, gaps, abandoned, duplicates,
         first_seen_ns, last_seen_ns, epoch, refused, refusals, owner, session_key) = row
        return cls(producer_id, max_seq, msgpack.unpackb(holes) if holes else [], gaps,
                   abandoned, duplicates, first_seen_ns, last_seen_ns, epoch, refused,
                   msgpack.unpackb(refusals) if refusals else [], owner, session_key)

    def ack(self, committed_ns: int) -> dict[str, Any]:
        """The acknowledgement ($bus.ack.<producer>) of this state. `holes`:
        the lowest ACK_MAX_HOLES ranges of seqs below `max_seq` not received,
        copied (the state moves on): a publisher re-sends just those."""
        return {"producer": self.producer_id, "epoch": self.epoch,
                "contiguous_seq": self.contiguous_seq, "max_seq": self.max_seq,
                "holes": [(first, last) for first, last in
                          self.holes[:protocol.ACK_MAX_HOLES]],
                "refused": self.refused, "committed_ns": committed_ns}

    def status(self) -> dict[str, Any]:
        """producer_status: the acknowledgement's fields and the remembered refusals."""
        return {**self.ack(0), "refusals": self.refusals}

    def summary(self) -> dict[str, Any]:
        return {"producer": self.producer_id, "epoch": self.epoch,
                "contiguous_seq": self.contiguous_seq, "max_seq": self.max_seq,
                "missing": self.missing, "gaps": self.gaps, "abandoned": self.abandoned,
                "duplicates": self.duplicates, "refused": self.refused}


class ProducerLedger:
    def __init__(self, load: Callable[[str], tuple[Any, ...] | None], max_cached: int = 10_000,
                 max_holes: int = MAX_HOLES) -> None:
        self._load = load
        self.max_cached = max_cached
        self.max_holes = max_holes
        self._states: OrderedDict[str, ProducerState] = OrderedDict()
        self._dirty: dict[str, ProducerState] = {}
        self._new_keys: dict[str, ProducerState] = {}  # sessions opened, keys not yet stored
        # Sent in the commit now in flight (writer/commits.py, an overlapped
        # commit): still uncommitted until it lands, and back to dirty if it fails.
        self._in_flight: dict[str, ProducerState] = {}
        self._in_flight_keys: dict[str, ProducerState] = {}
        self.duplicates = 0

    def accept(self, producer_id: str, epoch: int, seq: int, now_ns: int,
               signed: Signed) -> tuple[bool, str | None]:
        """(store, nack): store the message if `store`; else, if `nack` is a code,
        refuse it with that code, and if None it is a retransmission (acknowledged again).
        A message of the current session must carry its mac over `signed`, or
        NotAuthentic is raised. Messages of another epoch are refused whoever
        sent them (their key is not kept): a client takes a nack only for a seq
        it sent in its session (docs/protocol.md, step 5)."""
        state = self._states.get(producer_id)  # _touch, inlined for the hot path
        if state is None:
            state = self._touch(producer_id, now_ns)
        else:
            self._states.move_to_end(producer_id)
            state.last_seen_ns = now_ns
        if epoch == state.epoch and seq <= state.max_seq + MAX_SEQ_AHEAD:
            # _refusal, inlined for the hot path: the usual message of the
            # current session, whose mac is all there is to check.
            # The frames as three arguments: a call that unpacks them (*signed)
            # takes CPython's slow path, 0.08 us a message here.
            signer = state._signer or state.signer  # the property: once a session
            if signer is None or not signer.message_is_authentic(signed[0], signed[1],
                                                                 signed[2]):
                raise NotAuthentic(producer_id)
        else:
            refusal = self._refusal(state, epoch, seq, signed)
            if refusal is not None:
                return False, refusal
        self._dirty[producer_id] = state
        if seq == state.max_seq + 1:  # state.accept's usual case, inlined
            state.max_seq = seq
            return True, None
        if state.accept(seq, self.max_holes):
            return True, None
        self.duplicates += 1
        return False, state.refusal_of(seq)

    def refuse(self, producer_id: str, epoch: int, seq: int, code: str, now_ns: int,
               signed: Signed) -> str | None:
        """A message of this producer that the writer will not store: the code to
        nack it with, or None if its seq was stored before. `signed` as for accept."""
        state = self._touch(producer_id, now_ns)
        refusal = self._refusal(state, epoch, seq, signed)
        if refusal is not None:
            return refusal
        self._dirty[producer_id] = state
        return state.refuse(seq, code, self.max_holes)

    @staticmethod
    def _refusal(state: ProducerState, epoch: int, seq: int, signed: Signed) -> str | None:
        """Why a message of (epoch, seq) is refused whatever its content, or None;
        NotAuthentic if it is not the session key's."""
        if epoch != state.epoch:
            return protocol.PRODUCER_FENCED if epoch < state.epoch else protocol.UNKNOWN_SESSION
        if not state.authentic(signed):
            raise NotAuthentic(state.producer_id)
        if seq > state.max_seq + MAX_SEQ_AHEAD:
            return protocol.SEQ_OUT_OF_WINDOW
        return None

    def open(self, producer_id: str, now_ns: int, session_key: bytes,
             owner: str | None = None) -> ProducerState:
        """Start the next session of `producer_id`; committed with the next flush.
        `session_key` authenticates the session's messages and the writer's
        notifications to it; `owner` (a key) is recorded if the producer has
        none yet."""
        state = self._touch(producer_id, now_ns)
        state.open_session()
        state.owner = state.owner or owner
        state.session_key, state._signer = session_key, None
        self._dirty[producer_id] = state
        self._new_keys[producer_id] = state
        return state

    def replay(self, rows: Sequence[MessageRow]) -> list[ProducerState]:
        """The producers of `rows` (the oldest buffered messages) as committed,
        plus these rows: what a transaction of only these rows must store beside
        them, so that the table always matches the committed messages (a full
        disk's backlog is committed in parts). Refusals among them are left out:
        their seqs stay holes until the whole backlog is committed, which only
        delays their acknowledgement; no hole is given up, however many there
        are. The cached states are not touched."""
        states: dict[str, ProducerState] = {}
        changed: dict[str, ProducerState] = {}
        for _topic, _payload, meta, producer, seq, _time_ns in rows:
            if producer is None or seq is None or not meta:
                continue
            identity = protocol.session_identity(
                msgpack.unpackb(meta, raw=False, strict_map_key=False))
            if identity is None:
                continue  # no session: stored without the ledger
            state = states.get(producer)
            if state is None:
                row = self._load(producer)
                state = states[producer] = ProducerState.from_row(row) if row \
                    else ProducerState(producer)
            # No hole is given up here (MAX_HOLES): one given up would be
            # acknowledged though its message may still wait in the buffer.
            if identity[1] == state.epoch and state.accept(seq, sys.maxsize):
                changed[producer] = state
        return list(changed.values())

    def peek(self, producer_id: str) -> ProducerState | None:
        """The state of a known producer (loaded if need be), None for an unknown one."""
        state = self._states.get(producer_id)
        if state is not None:
            return state
        row = self._load(producer_id)
        return None if row is None else self._cache(ProducerState.from_row(row))

    def _touch(self, producer_id: str, now_ns: int) -> ProducerState:
        state = self._states.get(producer_id)
        if state is None:
            row = self._load(producer_id)
            state = self._cache(ProducerState.from_row(row) if row else
                                ProducerState(producer_id, first_seen_ns=now_ns))
        else:
            self._states.move_to_end(producer_id)
        state.last_seen_ns = now_ns
        return state

    def _cache(self, state: ProducerState) -> ProducerState:
        self._states[state.producer_id] = state
        if len(self._states) > self.max_cached:
            # The least recently used clean state other than this one (about to be
            # used); dirty ones, and those in flight, wait for their commit.
            victim = next((pid for pid in self._states
                           if not self.is_dirty(pid) and pid != state.producer_id), None)
            if victim is not None:
                del self._states[victim]
        return state

    @property
    def dirty(self) -> bool:
        return bool(self._dirty)

    def is_dirty(self, producer_id: str) -> bool:
        """Has `producer_id` changes not yet committed (or in flight)?"""
        return producer_id in self._dirty or producer_id in self._in_flight

    def dirty_rows(self) -> list[tuple[Any, ...]]:
        """Rows for the producers table (and the keys of the sessions opened
        since the last commit), to commit with the current batch."""
        return [state.row(pid in self._new_keys) for pid, state in self._dirty.items()]

    def committed(self) -> list[ProducerState]:
        """The states just committed, now clean."""
        states = list(self._dirty.values())
        self._dirty.clear()
        self._new_keys.clear()
        return states

    def committing(self) -> list[ProducerState]:
        """The dirty states, as a commit that overlaps the loop takes them
        (`dirty_rows` first): in flight, and still dirty to `is_dirty`, until
        `landed` or `failed`. One such commit at a time."""
        assert not self._in_flight, "one commit in flight at a time"
        self._in_flight, self._dirty = self._dirty, {}
        self._in_flight_keys, self._new_keys = self._new_keys, {}
        return list(self._in_flight.values())

    def landed(self) -> None:
        """The commit in flight is committed: its states are clean, unless
        changed since (then they are dirty again, and stay so)."""
        self._in_flight, self._in_flight_keys = {}, {}

    def failed(self) -> None:
        """The commit in flight failed: its states are dirty again (their rows,
        and a session key not yet stored, go with the next commit)."""
        for pid, state in self._in_flight.items():
            self._dirty.setdefault(pid, state)
        for pid, state in self._in_flight_keys.items():
            self._new_keys.setdefault(pid, state)
        self._in_flight, self._in_flight_keys = {}, {}

    def snapshot(self, limit: int = 20) -> dict[str, Any]:
        with_holes = [s for s in self._states.values() if s.holes]
        with_holes.sort(key=lambda s: s.missing, reverse=True)
        return {"cached": len(self._states), "duplicates_skipped": self.duplicates,
                "with_missing": len(with_holes),
                "missing": [s.summary() for s in with_holes[:limit]]}

    def remove(self, producer_id: str) -> ProducerState | None:
        """`producer_remove` (`bus-cli producers rm`): end the current session and
        free the id for any key; None for an unknown producer. The row stays:
        it holds the id's high-water marks. Its epoch moves to one handed to
        nobody, so every session opened so far is fenced (`producer_fenced`)
        and no message of the new one is authentic (no session key), and the
        next `producer_open`, by any key, gets the epoch after it; sequence
        numbers go on after `max_seq`, so (producer, seq) stays unique in the
        stored messages. What the ended session never delivered is given up
        (`abandoned`), as at any new session. Committed with the next flush."""
        state = self.peek(producer_id)
        if state is None:
            return None
        state.open_session()
        state.owner = None
        state.session_key, state._signer = None, None
        self._dirty[producer_id] = state
        return state

    def listed(self, row: tuple[Any, ...]) -> ProducerState:
        """A producer of a listing (storage.sessions.list_producers): its cached
        state, newer than the row while uncommitted, else the row's (not
        cached: a listing must not push the producers in use out of the cache)."""
        state = self._states.get(row[0])
        return state if state is not None else ProducerState.from_row(row)


def describe(state: ProducerState) -> dict[str, Any]:
    """A producer as `producer_info` and `producers_list` show it."""
    return {**state.summary(), "owner": state.owner, "first_seen_ns": state.first_seen_ns,
            "last_seen_ns": state.last_seen_ns}
