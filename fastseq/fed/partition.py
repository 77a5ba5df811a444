"""Client partitioners: IID, Dirichlet(alpha) over a key, pathological k-keys-per-client.

Every partitioner takes one hashable key per training example (a label, a category, ...),
is seeded and reproducible, assigns every example to exactly one client and guarantees
``min_size`` examples per client (Dirichlet: resample, then rebalance).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Hashable, Sequence

import numpy as np

from ..config import ConfigError

PARTITIONERS = ("iid", "dirichlet", "pathological")


def _classes(keys: Sequence[Hashable]) -> tuple[list, dict]:
    classes = sorted(set(keys), key=lambda k: (type(k).__name__, str(k)))
    return classes, {c: i for i, c in enumerate(classes)}


def _check(n: int, num_clients: int, min_size: int) -> None:
    if num_clients < 1:
        raise ConfigError(f"clients must be >= 1, got {num_clients}")
    if min_size < 0:
        raise ConfigError(f"min_size must be >= 0, got {min_size}")
    if n < num_clients * min_size:
        raise ConfigError(f"{n} examples cannot give {num_clients} clients at least {min_size} each; "
                          f"use fewer clients or a smaller min_size")


def iid_partition(keys: Sequence[Hashable], num_clients: int, seed: int = 0, min_size: int = 1) -> list[list[int]]:
    n = len(keys)
    _check(n, num_clients, min_size)
    perm = np.random.default_rng(seed).permutation(n)
    return [sorted(int(i) for i in part) for part in np.array_split(perm, num_clients)]


def _rebalance(parts: list[list[int]], min_size: int, rng: np.random.Generator) -> list[list[int]]:
    """Move examples from the largest clients to those under ``min_size``."""
    for i in range(len(parts)):
        while len(parts[i]) < min_size:
            donor = max(range(len(parts)), key=lambda j: len(parts[j]))
            k = int(rng.integers(len(parts[donor])))
            parts[i].append(parts[donor].pop(k))
    return parts


def dirichlet_partition(keys: Sequence[Hashable], num_clients: int, alpha: float = 0.5, seed: int = 0,
                        min_size: int = 1, max_tries: int = 100) -> list[list[int]]:
    """FedSA-LoRA's splitter: for each class draw ``dirichlet(alpha * 1)`` over clients and split
    that class's examples by those proportions. Resampled until every client has ``min_size``
    examples (up to ``max_tries``), then rebalanced."""
    if not (isinstance(alpha, (int, float)) and alpha > 0 and math.isfinite(alpha)):
        raise ConfigError(f"alpha must be a positive number, got {alpha!r}")
    n = len(keys)
    _check(n, num_clients, min_size)
    classes, index = _classes(keys)
    y = np.array([index[k] for k in keys])
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = []
    for _ in range(max_tries):
        parts = [[] for _ in range(num_clients)]
        for c in range(len(classes)):
            idx = np.flatnonzero(y == c)
            rng.shuffle(idx)
            p = rng.dirichlet(np.full(num_clients, float(alpha)))
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(int)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].extend(int(i) for i in chunk)
        if min(len(p) for p in parts) >= min_size:
            break
    parts = _rebalance(parts, min_size, rng)
    return [sorted(p) for p in parts]


def pathological_partition(keys: Sequence[Hashable], num_clients: int, classes_per_client: int = 2,
                           seed: int = 0, min_size: int = 1) -> list[list[int]]:
    """Each client holds (about) ``classes_per_client`` keys: after a seeded permutation of the
    classes, client i owns classes ``(i*k + j) mod C``; each class's examples are split evenly
    among its owners."""
    n = len(keys)
    _check(n, num_clients, min_size)
    classes, index = _classes(keys)
    C, k = len(classes), classes_per_client
    if k < 1 or k > C:
        raise ConfigError(f"classes_per_client must be in 1..{C}, got {k}")
    if num_clients * k < C:
        raise ConfigError(f"{num_clients} clients x {k} classes each cannot cover all {C} classes; "
                          f"raise clients or classes_per_client")
    rng = np.random.default_rng(seed)
    order = rng.permutation(C)
    owners: dict[int, list[int]] = {c: [] for c in range(C)}
    for i in range(num_clients):
        for j in range(k):
            c = int(order[(i * k + j) % C])
            if i not in owners[c]:
                owners[c].append(i)
    y = np.array([index[kk] for kk in keys])
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for c in range(C):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        for chunk, owner in zip(np.array_split(idx, len(owners[c])), owners[c]):
            parts[owner].extend(int(i) for i in chunk)
    small = [i for i, p in enumerate(parts) if len(p) < min_size]
    if small:
        raise ConfigError(f"pathological partition leaves clients {small} with fewer than {min_size} examples; "
                          f"use fewer clients or more classes_per_client")
    return [sorted(p) for p in parts]


def partition(keys: Sequence[Hashable], num_clients: int, scheme: str = "dirichlet", *, alpha: float = 0.5,
              classes_per_client: int = 2, seed: int = 0, min_size: int = 1) -> list[list[int]]:
    if scheme == "iid":
        return iid_partition(keys, num_clients, seed=seed, min_size=min_size)
    if scheme == "dirichlet":
        return dirichlet_partition(keys, num_clients, alpha=alpha, seed=seed, min_size=min_size)
    if scheme == "pathological":
        return pathological_partition(keys, num_clients, classes_per_client=classes_per_client, seed=seed,
                                      min_size=min_size)
    raise ConfigError(f"unknown partition {scheme!r}; valid: {', '.join(PARTITIONERS)}")


def label_histogram(keys: Sequence[Hashable], parts: Sequence[Sequence[int]]) -> list[Counter]:
    return [Counter(keys[i] for i in p) for p in parts]


def mean_label_entropy(keys: Sequence[Hashable], parts: Sequence[Sequence[int]]) -> float:
    """Mean over clients of the Shannon entropy (nats) of the client's key distribution."""
    ents = []
    for h in label_histogram(keys, parts):
        tot = sum(h.values())
        ents.append(-sum((v / tot) * math.log(v / tot) for v in h.values() if v) if tot else 0.0)
    return float(np.mean(ents)) if ents else 0.0


def format_histogram(keys: Sequence[Hashable], parts: Sequence[Sequence[int]],
                     names: Sequence[str] | None = None, max_rows: int | None = None,
                     max_keys: int | None = None) -> str:
    """A printable per-client key histogram (one row per client; with more than ``max_rows``
    clients, the first and last ``max_rows // 2`` rows and a line with the sizes of the rest).
    With more than ``max_keys`` distinct keys (e.g. user ids), each row gives the client's size,
    its number of distinct keys and its most frequent key instead of a column per key."""
    classes, _ = _classes(keys)
    hist = label_histogram(keys, parts)
    if max_keys is not None and len(classes) > max_keys:
        lines = [f"{len(classes)} distinct keys; client  examples  keys  most frequent key"]
        shown = range(len(hist)) if max_rows is None or len(hist) <= max_rows else \
            [*range(max_rows // 2), *range(len(hist) - max_rows // 2, len(hist))]
        for i in shown:
            top = min(hist[i].items(), key=lambda kv: (-kv[1], str(kv[0])))[0] if hist[i] else "-"  # ties: first
            lines.append(f"{i:>6} {sum(hist[i].values()):>9} {len(hist[i]):>5}  {str(top)[:30]}")
        if len(shown) < len(hist):
            lines.insert(1 + max_rows // 2, f"   ... {len(hist) - len(shown)} more clients")
        return "\n".join(lines)

    def label(c: Any) -> str:
        if names is not None and isinstance(c, int) and 0 <= c < len(names):
            return str(names[c])
        return str(c)

    heads = [label(c)[:10] for c in classes]
    width = max([6] + [len(h) for h in heads])
    lines = ["client " + " ".join(h.rjust(width) for h in heads) + "  total".rjust(width + 2)]

    def row(i: int) -> str:
        h = hist[i]
        return (f"{i:>6} " + " ".join(str(h.get(c, 0)).rjust(width) for c in classes)
                + str(sum(h.values())).rjust(width + 2))

    if max_rows is None or len(hist) <= max_rows:
        lines += [row(i) for i in range(len(hist))]
    else:
        half = max(1, max_rows // 2)
        rest = sorted(sum(h.values()) for h in hist[half:len(hist) - half])
        lines += [row(i) for i in range(half)]
        if rest:
            lines.append(f"   ... {len(rest)} more clients, {rest[0]}..{rest[-1]} examples each "
                         f"(median {rest[len(rest) // 2]})")
        lines += [row(i) for i in range(len(hist) - half, len(hist))]
    return "\n".join(lines)
