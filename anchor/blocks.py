"""When the worker syncs the wallet and checks its anchors: at start, at each
new block (bitcoind's ZMQ `hashblock`), and when asking for the best block
every BUS_ANCHOR_BLOCK_POLL_S finds one the wallet sync has not reached (the
fallback: notifications can be lost to a HWM or a bitcoind restart). What
`stats` tells of bitcoind is kept here: its chain when last asked, and the
last error of a call (None once a call succeeds again)."""

from __future__ import annotations

import time
from typing import Any

import zmq

from anchor.bitcoind import BitcoinRpc, parse_hashblock


class BlockWatch:
    def __init__(self, rpc: BitcoinRpc, hashblock: zmq.Socket | None, poll_s: float) -> None:
        self.rpc = rpc
        self.hashblock = hashblock
        self.poll_s = poll_s
        self.due = True                    # sync and check anchors at start
        self._next_poll = 0.0
        self.node: dict[str, Any] = {}
        self.error: str | None = None

    def wake(self) -> None:
        """Check at the next pass (a transaction found mined meanwhile)."""
        self.due = True

    def watch(self, now: float, synced_hash: str | None, poll: bool = True) -> None:
        """Take the notifications that came; ask for the best block when the
        poll is due (`poll`: once the wallet sync exists)."""
        if self.hashblock is not None:
            while self.hashblock.poll(0):
                if parse_hashblock(self.hashblock.recv_multipart()) is not None:
                    self.due = True
        if now >= self._next_poll and poll:
            self._next_poll = now + self.poll_s
            chain = self.rpc.call("getblockchaininfo")
            self.node = {"height": chain["blocks"], "best": chain["bestblockhash"],
                         "seen_ns": time.time_ns()}
            self.error = None
            if chain["bestblockhash"] != synced_hash:
                self.due = True

    def snapshot(self, url: str) -> dict[str, Any]:
        return {"url": url, "reachable": self.error is None and bool(self.node),
                "error": self.error, **self.node}
