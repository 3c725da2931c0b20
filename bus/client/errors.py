"""What the client library raises."""

from __future__ import annotations

from bus import protocol


class BusError(Exception):
    """The bus answered with an error, or could not be reached."""

    def __init__(self, message: str, code: str = "error") -> None:
        super().__init__(message)
        self.code = code


class BusTimeout(BusError):
    """No answer within the timeout."""

    def __init__(self, message: str) -> None:
        super().__init__(message, protocol.TIMEOUT)


class ProducerFenced(BusError):
    """A newer session of this producer id was opened (another Publisher with
    the same id, usually a restarted one): this one may not publish any more."""

    def __init__(self, message: str) -> None:
        super().__init__(message, protocol.PRODUCER_FENCED)


class MessageRefused(BusError):
    """The writer refused messages: `refused` lists (seq, code, reason), oldest
    first; `code` is the first one's. `unknown` counts refusals whose seqs could
    not be learned (more than the writer remembers were missed)."""

    def __init__(self, refused: list[tuple[int, str, str]], unknown: int = 0) -> None:
        parts = [f"seq {seq}: {code} ({reason})" for seq, code, reason in refused[:5]]
        if len(refused) > 5:
            parts.append(f"and {len(refused) - 5} more")
        if unknown:
            parts.append(f"{unknown} more refused, seqs unknown")
        super().__init__(f"{len(refused) + unknown} message(s) refused by the writer: "
                         + "; ".join(parts), refused[0][1] if refused else "refused")
        self.refused = refused
        self.unknown = unknown
