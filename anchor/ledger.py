"""The anchors not yet confirmed, as the worker holds them, and their documents.

The writer's record is the truth (`anchor_open`): after a restart, or a
reply that was lost, the worker reloads its open anchors from there. An
anchor is a map in the writer's shape (docs/protocol.md, `anchor_open`):
anchor_id, root, size, txid, raw_tx, fee_sat, vsize, lease_id, utxo_txid,
utxo_vout, replaced_txids, status (an `AnchorStatus`), broadcast_height.
Its documents in leaf order are kept from its recording, or asked of the
writer once (`anchor_leaves`) for an anchor recovered after a restart.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from anchor.bitcoind import RPC_INVALID_ADDRESS_OR_KEY, BitcoinRpc, RpcError
from anchor.requests import Document
from anchor.reservations import UtxoClient
from bus.protocol import AnchorStatus


class OpenAnchors:
    def __init__(self, utxos: UtxoClient) -> None:
        self.utxos = utxos
        self.anchors: dict[int, dict[str, Any]] = {}   # by anchor id
        self._leaves: dict[int, list[Document]] = {}

    def __len__(self) -> int:
        return len(self.anchors)

    def get(self, anchor_id: int) -> dict[str, Any] | None:
        return self.anchors.get(anchor_id)

    def with_status(self, status: AnchorStatus) -> list[dict[str, Any]]:
        """The open anchors in `status`, a copy: a step may change the ledger."""
        return [a for a in self.anchors.values() if a["status"] == status]

    def by_status(self) -> dict[str, int]:
        return dict(Counter(a["status"] for a in self.anchors.values()))

    def reload(self) -> None:
        """The writer's open anchors replace the ones held here. After a lost
        reply the writer's record is what happened: an anchor recorded whose
        reply never came (signed, to broadcast), a fee bump committed under
        an earlier build (its txid and raw_tx, not this process's)."""
        self.anchors = {anchor["anchor_id"]: anchor
                        for anchor in self.utxos.call("anchor_open", {})["anchors"]}

    def add(self, anchor: dict[str, Any], docs: list[Document] | None = None) -> None:
        """An anchor open (recorded, or back from a reorg); its documents if known."""
        self.anchors[anchor["anchor_id"]] = anchor
        if docs is not None:
            self._leaves[anchor["anchor_id"]] = docs

    def close(self, anchor_id: int) -> None:
        """Confirmed (perhaps again, after a reorg): no longer open."""
        self.anchors.pop(anchor_id, None)
        self._leaves.pop(anchor_id, None)

    def drop(self, anchor: dict[str, Any]) -> list[Document]:
        """A failed anchor leaves the ledger; its documents, to be anchored again."""
        del self.anchors[anchor["anchor_id"]]
        docs = self.documents(anchor)
        del self._leaves[anchor["anchor_id"]]
        return docs

    def documents(self, anchor: dict[str, Any]) -> list[Document]:
        """The anchor's documents in leaf order: kept from its recording, or (for
        an anchor recovered after a restart) asked of the writer once."""
        docs = self._leaves.get(anchor["anchor_id"])
        if docs is None:
            leaves = self.utxos.call("anchor_leaves",
                                     {"anchor_id": anchor["anchor_id"]})["leaves"]
            docs = self._leaves[anchor["anchor_id"]] = [Document(h, ref, mid)
                                                        for h, ref, mid in leaves]
        return docs


def mined_transaction(rpc: BitcoinRpc, anchor: dict[str, Any]
                      ) -> tuple[str, dict[str, Any]] | None:
    """The anchor's transaction that is in a block, if any, and bitcoind's
    `gettransaction` of it (after a fee bump, the replaced one may be the one
    mined)."""
    for txid in [anchor["txid"], *reversed(anchor["replaced_txids"])]:
        try:
            info = rpc.call("gettransaction", txid)
        except RpcError as exc:
            if exc.code == RPC_INVALID_ADDRESS_OR_KEY:  # never reached this node
                continue
            raise
        if info.get("confirmations", 0) > 0:
            return txid, info
    return None
