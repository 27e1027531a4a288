"""Checks of a client's reply before it may enter an aggregate."""

from __future__ import annotations

from dataclasses import dataclass

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Message, RecordDict

Spec = dict[str, tuple[tuple[int, ...], str]]


class ReplyRejected(ValueError):
    """A reply that must not be aggregated; the message says why."""


@dataclass
class TrainReply:
    arrays: dict[str, np.ndarray]
    num_examples: int
    train_loss: float
    seconds: float | None = None  # the client's own time on the message, as it reports it


def node_of_reply(reply: Message, sent: list[Message]) -> int:
    """The node a reply stands for. An error that the SuperLink makes for a node that went away comes
    from the SuperLink itself: whose it is, the message it replies to says (the grid sets each message's
    id as it sends it; a message never sent through a grid, in unit tests, has none, and the sender tells)."""
    for m in sent:
        if m.metadata.message_id and m.metadata.message_id == reply.metadata.reply_to_message_id:
            return m.metadata.dst_node_id
    return reply.metadata.src_node_id


def tensor_spec(tensors: Mapping[str, torch.Tensor]) -> Spec:
    """Key -> (shape, numpy dtype) of each array a reply must return."""
    return {k: (tuple(t.shape), str(t.numpy().dtype)) for k, t in tensors.items()}


def _listed(keys: list[str]) -> str:
    return str(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


def parse_train_reply(content: RecordDict, spec: Spec) -> TrainReply:
    """Decode a training reply, or raise ReplyRejected.

    The content must hold ArrayRecord "arrays" with exactly the keys of `spec`, each of its shape and
    dtype with finite values, and MetricRecord "metrics" with a positive integer "num-examples" and a
    finite "train_loss"; an optional "client-seconds" (how long the client spent on the message) is kept
    where it is a number of seconds.
    """
    record = content.array_records.get("arrays")
    if record is None:
        raise ReplyRejected("no ArrayRecord 'arrays'")
    if missing := sorted(set(spec) - set(record)):
        raise ReplyRejected(f"missing arrays {_listed(missing)}")
    if extra := sorted(set(record) - set(spec)):
        raise ReplyRejected(f"unexpected arrays {_listed(extra)}")
    arrays = {}
    for key, (shape, dtype) in spec.items():
        a = record[key]
        if tuple(a.shape) != shape or a.dtype != dtype:
            raise ReplyRejected(f"array '{key}' is {tuple(a.shape)} {a.dtype}, expected {shape} {dtype}")
        try:
            values = a.numpy()
        except Exception as e:  # a corrupt buffer or a foreign serialisation
            raise ReplyRejected(f"array '{key}' cannot be decoded: {e}") from e
        if values.shape != shape or str(values.dtype) != dtype:
            raise ReplyRejected(f"array '{key}' decodes to {values.shape} {values.dtype}, not {shape} {dtype}")
        if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
            raise ReplyRejected(f"array '{key}' has non-finite values")
        arrays[key] = values
    metrics = content.metric_records.get("metrics")
    if metrics is None:
        raise ReplyRejected("no MetricRecord 'metrics'")
    n = metrics.get("num-examples")
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise ReplyRejected(f"'num-examples' must be a positive integer (got {n!r})")
    loss = metrics.get("train_loss")
    if not isinstance(loss, (int, float)) or not np.isfinite(loss):
        raise ReplyRejected(f"'train_loss' must be a finite number (got {loss!r})")
    seconds = metrics.get("client-seconds")  # optional: a diagnostic, not checked beyond its type
    seconds = float(seconds) if isinstance(seconds, (int, float)) and np.isfinite(seconds) and seconds >= 0 else None
    return TrainReply(arrays, n, float(loss), seconds)
