"""The byte ledger: what really travels, measured on the serialized arrays of each message."""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import Message, RecordDict


def payload_bytes(content: RecordDict) -> int:
    """Bytes of the serialized arrays a message carries (each Array's buffer, as sent)."""
    return sum(len(array.data) for record in content.array_records.values() for array in record.values())


def message_bytes(message: Message) -> int:
    return payload_bytes(message.content) if message.has_content() else 0


@dataclass
class Ledger:
    """Bytes each way, per round and in total."""

    up: int = 0
    down: int = 0
    total_up: int = 0
    total_down: int = 0

    def start_round(self) -> None:
        self.up = self.down = 0

    def sent(self, message: Message) -> None:
        n = message_bytes(message)
        self.down += n
        self.total_down += n

    def received(self, message: Message) -> None:
        n = message_bytes(message)
        self.up += n
        self.total_up += n
