"""The anchor worker's side of the writer's `utxo_*` commands.

Every call is a Lazy Pirate request (ZeroMQ Guide, chapter 4): wait
`timeout_ms` for the reply; on silence close the REQ socket (a REQ without its
reply is stuck), open a new one and send again, backing off, until
`retry_for_s` has passed. A writer restart is survived that way. Retries are
safe because a mutating request carries a request id that stays the same
across its retries: the writer answers a repeated id with the reply it stored
the first time (see writer/utxos.py).

The retries run to a deadline on `clock`, and `pause(seconds)` waits between
them: the anchor worker's returns at once when the process is asked to stop
(the call then raises its last error, as at the deadline), and a test's
steps a clock of its own without sleeping.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import zmq

from bus import protocol
from bus.client import BusError, ControlClient
from bus.security import ClientKeys

# Errors after which the same request may succeed later.
RETRYABLE = (protocol.TIMEOUT, protocol.UNAVAILABLE)


class NoUtxo(BusError):
    """No spendable UTXO matches the reservation."""


def sleep_for(seconds: float) -> bool:
    """The pause between retries outside a process that can be stopped."""
    time.sleep(seconds)
    return True


class UtxoClient:
    def __init__(self, endpoint: str, *, timeout_ms: int = 1000, retry_for_s: float = 30.0,
                 owner: str | None = None, context: zmq.Context | None = None,
                 curve: ClientKeys | None = None, clock: Callable[[], float] = time.monotonic,
                 pause: Callable[[float], bool] = sleep_for) -> None:
        self.retry_for_s = retry_for_s
        self.clock = clock
        self.pause = pause    # waits between retries; False: stop retrying
        self.owner = owner
        self.retries = 0  # requests sent again after a timeout or a busy writer
        self._control = ControlClient(endpoint, timeout_ms=timeout_ms, context=context,
                                      curve=curve)

    def call(self, cmd: str, args: dict[str, Any]) -> Any:
        """Send until answered or retry_for_s has passed; BusTimeout then.
        Other error replies raise BusError (NoUtxo for `no_utxo`) at once."""
        deadline = self.clock() + self.retry_for_s
        backoff = 0.05
        while True:
            try:
                return self._control.request(cmd, args)
            except BusError as exc:
                if exc.code == protocol.NO_UTXO:
                    raise NoUtxo(str(exc), exc.code) from None
                if exc.code not in RETRYABLE or self.clock() + backoff >= deadline:
                    raise
                failed = exc
            self.retries += 1
            if not self.pause(backoff):  # the process stops: no further retry
                raise failed
            backoff = min(backoff * 2, 1.0)

    @staticmethod
    def new_request_id() -> str:
        return uuid.uuid4().hex

    # --- leases ---------------------------------------------------------------

    def reserve(self, min_amount_sat: int, lease_seconds: float, *, policy: str = "smallest",
                min_confirmations: int = 1, request_id: str | None = None) -> dict[str, Any]:
        """One available UTXO of at least `min_amount_sat` under a new lease:
        {lease_id, expires_ns, txid, vout, amount_sat, address, script_pubkey,
        block_height, block_time, confirmations}. Raises NoUtxo."""
        args = {"request_id": request_id or self.new_request_id(),
                "min_amount_sat": min_amount_sat, "lease_seconds": lease_seconds,
                "policy": policy, "min_confirmations": min_confirmations}
        if self.owner:
            args["owner"] = self.owner
        return self.call("utxo_reserve", args)

    def renew(self, lease_id: str, lease_seconds: float) -> dict[str, Any]:
        return self.call("utxo_renew", {"lease_id": lease_id, "lease_seconds": lease_seconds})

    def release(self, lease_id: str) -> bool:
        return self.call("utxo_release", {"lease_id": lease_id,
                                          "request_id": self.new_request_id()})["released"]

    def spend(self, lease_id: str, spending_txid: str,
              change: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        return self.call("utxo_spend", {"lease_id": lease_id, "spending_txid": spending_txid,
                                        "change": change or [],
                                        "request_id": self.new_request_id()})

    def get(self, txid: str, vout: int) -> dict[str, Any]:
        return self.call("utxo_get", {"txid": txid, "vout": vout})

    # --- wallet sync ----------------------------------------------------------

    def upsert(self, utxos: list[dict[str, Any]], generation: int = 0) -> int:
        return self.call("utxo_upsert", {"utxos": utxos, "generation": generation})["upserted"]

    def remove(self, outpoints: list[tuple[str, int]], spending_txid: str | None = None) -> int:
        args: dict[str, Any] = {"outpoints": [list(p) for p in outpoints]}
        if spending_txid:
            args["spending_txid"] = spending_txid
        return self.call("utxo_remove", args)["removed"]

    def restore(self, outpoints: list[tuple[str, int]], spent_txid: str) -> int:
        return self.call("utxo_restore", {"outpoints": [list(p) for p in outpoints],
                                          "spent_txid": spent_txid})["restored"]

    def sweep(self, generation: int) -> int:
        swept = 0
        while True:
            result = self.call("utxo_sweep", {"generation": generation})
            swept += result["swept"]
            if not result["more"]:
                return swept

    def set_tip(self, height: int, block_hash: str) -> None:
        self.call("utxo_tip", {"height": height, "hash": block_hash})

    def tip(self) -> tuple[int | None, str | None]:
        """The wallet tip the table was last synced to."""
        tip = self.call("utxo_tip", {})
        return tip["height"], tip["hash"]

    def close(self) -> None:
        self._control.close()

    def __enter__(self) -> UtxoClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

