"""The byte ledger: what really travels, measured on the serialized arrays of each message.

Flower serializes each array as numpy's `.npy` buffer (`np.save`, no pickle); `serialized_bytes` is
that buffer's length, for what a method sends before any message exists (its compression report).
The ServerApp's grid counts the buffers of the real messages into a Ledger.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # not imported: what reads the records (fedlora-report) needs no torch (0.3-0.5 GB, 2 s)
    import torch


def serialized_bytes(tensor: torch.Tensor | np.ndarray) -> int:
    """Bytes of the array as it travels: numpy's .npy buffer, header included."""
    buf = io.BytesIO()
    np.save(buf, tensor if isinstance(tensor, np.ndarray) else tensor.detach().cpu().numpy(), allow_pickle=False)
    return buf.getbuffer().nbytes


@dataclass
class Ledger:
    """Bytes each way, per round and in total."""

    up: int = 0
    down: int = 0
    total_up: int = 0
    total_down: int = 0

    def start_round(self) -> None:
        self.up = self.down = 0

    def sent(self, nbytes: int) -> None:
        self.down += nbytes
        self.total_down += nbytes

    def received(self, nbytes: int) -> None:
        self.up += nbytes
        self.total_up += nbytes
