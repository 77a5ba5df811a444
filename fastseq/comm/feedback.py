"""Error-feedback memory (per client) and the server-side downlink state.

Both are tensors-only and independent of any model code.
"""

from __future__ import annotations

from typing import Any, Mapping, MutableMapping

import torch

from .codecs import Codec, get_codec
from .errors import SchemaMismatch
from .wire import Update, decode, encode

__all__ = ["ErrorFeedback", "DownlinkState", "apply_downlink"]


class ErrorFeedback:
    """Residual memory of one client: ``compensated = delta + residual``; after encoding,
    ``residual = compensated - decode(encode(compensated))``.

    Typical use on a client::

        blob = ef.encode(delta, codec, round=r, client_id=cid)   # compensates + updates memory

    or by hand: ``comp = ef.compensate(delta)``, encode/decode, ``ef.update(comp, decoded)``.
    The memory is fp32, keyed like the delta; :meth:`state_dict` / :meth:`load_state_dict`
    use plain tensors (safetensors-friendly).
    """

    def __init__(self):
        self.residual: dict[str, torch.Tensor] = {}

    def compensate(self, delta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for k, d in delta.items():
            d = d.detach().float().cpu()
            r = self.residual.get(k)
            if r is not None and r.shape != d.shape:
                raise ValueError(f"error feedback: {k!r} has shape {list(d.shape)}, "
                                 f"its residual {list(r.shape)}")
            out[k] = d + r if r is not None else d.clone()
        return out

    def update(self, compensated: Mapping[str, torch.Tensor], decoded: Mapping[str, torch.Tensor]) -> None:
        for k, c in compensated.items():
            self.residual[k] = (c.detach().float().cpu() - decoded[k].detach().float().cpu()).clone()

    def encode(self, delta: Mapping[str, torch.Tensor], codec: str | Codec = "none", **kwargs) -> bytes:
        """Compensate, encode (``kwargs`` as for :func:`fastseq.comm.encode`), update memory."""
        comp = self.compensate(delta)
        blob = encode(comp, codec, **kwargs)
        dec = decode(blob, max_bytes=len(blob), max_elements=max(1, sum(t.numel() for t in comp.values())))
        self.update(comp, dec.tensors)
        return blob

    def residual_norm(self) -> float:
        return float(sum(float(r.double().pow(2).sum()) for r in self.residual.values()) ** 0.5)

    def reset(self) -> None:
        self.residual.clear()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.residual.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        for k, v in state.items():
            if not isinstance(v, torch.Tensor) or not v.is_floating_point():
                raise TypeError(f"error feedback state {k!r} must be a floating tensor")
        self.residual = {k: v.detach().float().clone() for k, v in state.items()}


def apply_downlink(local_state: Mapping[str, torch.Tensor], update: Update | Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Client side: new state from a decoded downlink ``Update``.

    A full update (``extra["full"]``) replaces the state; otherwise each tensor is
    ``local + delta`` computed in fp32 and cast to the local tensor's dtype. Returns a new
    dict (the input is not modified). Raises :class:`SchemaMismatch` when a delta names a
    tensor the client does not have or with another shape.
    """
    if isinstance(update, Update):
        tensors, full = update.tensors, update.full
    else:
        tensors, full = update["tensors"], bool(update.get("full", False))
    if full:
        return {k: v.detach().clone() for k, v in tensors.items()}
    out = {k: v for k, v in local_state.items()}
    for k, d in tensors.items():
        if k not in local_state:
            raise SchemaMismatch(f"downlink delta for {k!r}, which the client does not hold "
                                 f"(it holds {sorted(local_state)[:5]}...)")
        cur = local_state[k]
        if tuple(cur.shape) != tuple(d.shape):
            raise SchemaMismatch(f"downlink delta for {k!r} has shape {list(d.shape)}, "
                                 f"the client's tensor {list(cur.shape)}")
        out[k] = (cur.detach().float() + d.float().to(cur.device)).to(cur.dtype)
    return out


class DownlinkState:
    """Server side: what each client holds, so each downlink is ``global_now - client_known``.

    Delta coding only pays with a lossy ``codec``: its errors are corrected by the next delta.
    With a lossless codec (``none`` without top-k, the default) a delta costs as many bytes as
    the full state, so every downlink is the full state (``extra={"full": True}``) and nothing is
    kept per client (``delta=False``): what a client holds after a downlink is the state sent, and
    the server needs no memory that grows with the number of clients. ``delta=True`` forces delta
    coding, ``delta=False`` full states.

    In delta mode, a client never seen (or whose tensor names/shapes changed) gets the full state,
    encoded with ``full_codec`` (default: the same codec). ``known`` (client id -> state) is any
    mutable mapping: a dict by default, or a store that keeps the states on disk.
    """

    def __init__(self, codec: str | Codec = "none", *, full_codec: str | Codec | None = None,
                 delta: bool | None = None, known: MutableMapping[str, dict[str, torch.Tensor]] | None = None,
                 **codec_params):
        self.codec = get_codec(codec, **codec_params)
        self.full_codec = self.codec if full_codec is None else get_codec(full_codec)
        self.delta = (not (self.codec.lossless and self.full_codec.lossless)) if delta is None else bool(delta)
        if not self.delta and not self.full_codec.lossless:
            raise ValueError(f"delta=False sends full states, which needs a lossless full_codec (got "
                             f"{self.full_codec.name!r}): a client could not be told what it holds")
        self.known: MutableMapping[str, dict[str, torch.Tensor]] = {} if known is None else known

    def send(self, client_id: str, global_state: Mapping[str, torch.Tensor], *, round: int = 0,
             method: str = "", extra: Mapping[str, Any] | None = None) -> tuple[bytes, dict[str, torch.Tensor]]:
        """``(blob, held)``: the blob for ``client_id`` and the state the client holds once it has
        applied it (the tensors of ``global_state`` themselves when no delta coding is used; in
        delta mode it is also recorded in ``known``)."""
        client_id = str(client_id)
        ex = dict(extra or {})
        n = max(1, sum(t.numel() for t in global_state.values()))
        if not self.delta:
            ex["full"] = True
            blob = encode(dict(global_state), self.full_codec, round=round, client_id=client_id,
                          method=method, direction="down", extra=ex)
            return blob, dict(global_state)  # lossless: the client decodes exactly these values
        known = self.known.get(client_id)
        full = known is None or set(known) != set(global_state) or any(
            tuple(known[k].shape) != tuple(v.shape) for k, v in global_state.items())
        if full:
            ex["full"] = True
            blob = encode(dict(global_state), self.full_codec, round=round, client_id=client_id,
                          method=method, direction="down", extra=ex)
            upd = decode(blob, max_bytes=len(blob), max_elements=n)
            held = apply_downlink({}, upd)
        else:
            ex["full"] = False
            delta = {k: v.detach().float().cpu() - known[k].float().cpu() for k, v in global_state.items()}
            blob = encode(delta, self.codec, round=round, client_id=client_id, method=method,
                          direction="down", extra=ex)
            upd = decode(blob, max_bytes=len(blob), max_elements=n)
            held = apply_downlink(known, upd)
        self.known[client_id] = held
        return blob, held

    def encode_for(self, client_id: str, global_state: Mapping[str, torch.Tensor], *, round: int = 0,
                   method: str = "", extra: Mapping[str, Any] | None = None) -> bytes:
        """Blob to send to ``client_id`` (see :meth:`send`)."""
        return self.send(client_id, global_state, round=round, method=method, extra=extra)[0]

    def client_state(self, client_id: str) -> dict[str, torch.Tensor] | None:
        """What ``client_id`` holds (delta mode; None without delta coding or for a new client)."""
        return self.known.get(str(client_id))

    def forget(self, client_id: str) -> None:
        self.known.pop(str(client_id), None)
