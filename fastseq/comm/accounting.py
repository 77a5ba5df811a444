"""Byte accounting: exact encoded sizes per tensor, client, direction and round."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from .errors import PayloadError
from .wire import Update, byte_breakdown

__all__ = ["ByteCounter"]


class ByteCounter:
    """Records every message's exact size (``len(blob)``), split into the stored bytes of
    each logical tensor and the header overhead (length prefix + JSON header).

    ``record(blob)`` reads round / client / direction from the blob's header (explicit
    keywords override). A blob that cannot be parsed is still counted, as
    ``rejected_bytes`` under the explicit round / client_id / direction (required then).
    """

    def __init__(self):
        # (round, direction, client) -> totals
        self._msgs: dict[tuple[int, str, str], dict[str, Any]] = {}

    def _slot(self, round: int, direction: str, client_id: str) -> dict[str, Any]:
        key = (int(round), direction, str(client_id))
        if key not in self._msgs:
            self._msgs[key] = {"bytes": 0, "header_bytes": 0, "messages": 0, "rejected_bytes": 0,
                               "rejected_messages": 0, "tensors": defaultdict(int)}
        return self._msgs[key]

    def record(self, blob: bytes | Update, *, round: int | None = None, client_id: str | None = None,
               direction: str | None = None) -> int:
        """Count one message; returns its size in bytes."""
        if isinstance(blob, Update):
            info = {"total": blob.nbytes, "header": blob.header_nbytes, "tensors": blob.tensor_nbytes,
                    "round": blob.round, "client_id": blob.client_id, "direction": blob.direction}
        else:
            try:
                info = byte_breakdown(blob)
            except PayloadError:
                if round is None or client_id is None or direction is None:
                    raise
                n = len(blob) if isinstance(blob, (bytes, bytearray, memoryview)) else 0
                s = self._slot(round, direction, client_id)
                s["rejected_bytes"] += n
                s["rejected_messages"] += 1
                return n
        r = info["round"] if round is None else round
        c = info["client_id"] if client_id is None else client_id
        d = info["direction"] if direction is None else direction
        if d not in ("up", "down"):
            raise ValueError(f"direction must be 'up' or 'down', got {d!r}")
        s = self._slot(r, d, c)
        s["bytes"] += info["total"]
        s["header_bytes"] += info["header"]
        s["messages"] += 1
        for k, v in info["tensors"].items():
            s["tensors"][k] += v
        return info["total"]

    def forget_before(self, round: int) -> None:
        """Drop the records of rounds before ``round`` (a long run needs only the current one's)."""
        for key in [k for k in self._msgs if k[0] < round]:
            del self._msgs[key]

    def rounds(self) -> list[int]:
        return sorted({k[0] for k in self._msgs})

    def summary(self, round: int | None = None, per_tensor: bool = False) -> dict[str, Any]:
        """Totals for one round (or all rounds with ``round=None``), JSON-able:
        ``uplink_bytes``, ``downlink_bytes``, header bytes, message counts, rejected bytes,
        ``clients: {id: {uplink_bytes, downlink_bytes, ...}}`` and, with ``per_tensor``,
        ``uplink_tensor_bytes`` / ``downlink_tensor_bytes`` (name -> bytes)."""
        out: dict[str, Any] = {}
        if round is not None:
            out["round"] = int(round)
        for d, pre in (("up", "uplink"), ("down", "downlink")):
            for f in ("bytes", "header_bytes", "messages", "rejected_bytes"):
                out[f"{pre}_{f}"] = 0
        clients: dict[str, dict[str, int]] = {}
        tens = {"up": defaultdict(int), "down": defaultdict(int)}
        for (r, d, c), s in sorted(self._msgs.items()):
            if round is not None and r != round:
                continue
            pre = "uplink" if d == "up" else "downlink"
            for f in ("bytes", "header_bytes", "messages", "rejected_bytes"):
                out[f"{pre}_{f}"] += s[f]
            cd = clients.setdefault(c, {"uplink_bytes": 0, "downlink_bytes": 0,
                                        "uplink_messages": 0, "downlink_messages": 0,
                                        "rejected_bytes": 0})
            cd[f"{pre}_bytes"] += s["bytes"]
            cd[f"{pre}_messages"] += s["messages"]
            cd["rejected_bytes"] += s["rejected_bytes"]
            for k, v in s["tensors"].items():
                tens[d][k] += v
        out["total_bytes"] = out["uplink_bytes"] + out["downlink_bytes"]
        out["clients"] = clients
        if per_tensor:
            out["uplink_tensor_bytes"] = dict(tens["up"])
            out["downlink_tensor_bytes"] = dict(tens["down"])
        return out

    def totals(self) -> dict[str, Any]:
        """Cumulative summary over all rounds."""
        return self.summary(None)
