"""The ServerApp's view of Flower's Grid: every message each way passes through it, so it counts the
bytes that travel and it stops waiting when the user stops the run."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

from fedlora.errors import RunInterrupted
from fedlora.ledger import Ledger


def message_bytes(message: Message) -> int:
    """Bytes of the serialized arrays a message carries (each Array's buffer, as sent)."""
    if not message.has_content():
        return 0
    return sum(len(a.data) for record in message.content.array_records.values() for a in record.values())


POLL_SECONDS = 0.25  # at most this long between two asks for the replies still awaited


class MeteredGrid:
    """A Grid whose `send_and_receive` counts the arrays of every message sent and every reply into
    `ledger`, and gives up as soon as `stop` is set, instead of waiting out the timeout for replies
    that will never come."""

    def __init__(self, grid: Grid, ledger: Ledger, stop: threading.Event):
        self._grid, self.ledger, self._stop = grid, ledger, stop
        # Flower's in-memory grid (simulation) pulls every 0.1 s, its HTTP grid (`flwr run`) every 3 s:
        # deployed, a reply waited on average 1.5 s more for the ServerApp to ask (benchmarks/README.md).
        self._poll = min(getattr(grid, "pull_interval", POLL_SECONDS), POLL_SECONDS)

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None,
                         ledger: Ledger | None = None) -> list[Message]:
        """Send, and wait for the replies; the arrays each way counted into `ledger` (the run's by default)."""
        ledger = ledger or self.ledger
        messages = list(messages)
        for m in messages:
            ledger.sent(message_bytes(m))
        waiting = set(self._grid.push_messages(messages))
        deadline = time.time() + timeout if timeout is not None else float("inf")
        replies: list[Message] = []
        while waiting and time.time() < deadline:
            if self._stop.is_set():
                raise RunInterrupted("stopped by the user")
            got = list(self._grid.pull_messages(waiting))
            for reply in got:
                ledger.received(message_bytes(reply))
            replies += got
            waiting -= {m.metadata.reply_to_message_id for m in got}
            if waiting:
                time.sleep(self._poll)
        return replies
