"""The wallet's upkeep in the writer: expired UTXO leases back to the pool and
old `utxo_*` replies pruned, once every UTXO_UPKEEP_SECONDS (`step(now)`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bus.logging import get_logger

if TYPE_CHECKING:
    from writer.utxos import UtxoBook

log = get_logger("writer")

# Expired UTXO leases go back to the pool, and old utxo_* replies are pruned, this often.
UTXO_UPKEEP_SECONDS = 1.0


class UtxoUpkeep:
    """Runs `utxos`' upkeep; a database error of `transient_errors` waits for
    the next turn."""

    def __init__(self, utxos: UtxoBook, transient_errors: tuple[type[Exception], ...]) -> None:
        self.utxos = utxos
        self.transient_errors = transient_errors
        self.due_at = 0.0

    def due(self, now: float) -> bool:
        """Is the upkeep due at `now` (time.monotonic())?"""
        return now >= self.due_at

    def step(self, now: float) -> None:
        """Return expired leases to the pool and prune old stored replies, once a
        second (a reservation also expires leases itself before it picks)."""
        if not self.due(now):
            return
        self.due_at = now + UTXO_UPKEEP_SECONDS
        try:
            expired = self.utxos.expire_leases()
            self.utxos.prune_requests()
        except self.transient_errors as exc:
            log.warning("utxo_upkeep_failed", error=str(exc), error_type=type(exc).__name__)
            return
        if expired:
            log.info("utxo_leases_expired", count=expired)
