"""Client partitions made by flwr-datasets' partitioners (``ExperimentConfig.partitioner``).

``partitioner`` names a class of ``flwr_datasets.partitioner`` (``DirichletPartitioner``,
``PathologicalPartitioner``, ``ShardPartitioner``, ``NaturalIdPartitioner``, ...). The class
itself partitions: fastseq hands it a ``datasets.Dataset`` of the partition key (one row per
training example, with the example's index) and reads back which indices each partition holds.

The class's arguments come from ``partitioner_options`` (a table) and, for those it leaves
out, from the run's own settings: ``num_partitions`` = ``clients``, ``partition_by`` = the key
column, ``alpha``, ``seed``, ``num_classes_per_partition`` = ``classes_per_client``,
``min_partition_size`` = ``min_client_size``. A partitioner that decides the number of
partitions itself (``NaturalIdPartitioner``: one per distinct value) must make ``clients``.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any, Hashable, Sequence

from ..config import ConfigError

EXTRA_HINT = 'pip install "fastseq[hf-data]"'
INDEX = "__fastseq_index__"
# Partitioners that split columns (vertical FL) or need Python objects no config can hold.
NOT_ROW_PARTITIONERS = ("Partitioner", "VerticalEvenPartitioner", "VerticalSizePartitioner",
                        "IdToSizeFncPartitioner")


def _module():
    try:
        import flwr_datasets.partitioner as module  # noqa: PLC0415
    except ImportError:
        raise ConfigError(f"--partitioner needs flwr-datasets, which is not installed: {EXTRA_HINT} (or use "
                          f"fastseq's own --partition)") from None
    return module


def partitioner_names() -> list[str]:
    """The row partitioners of the installed flwr-datasets, sorted."""
    module = _module()
    return sorted(n for n in getattr(module, "__all__", dir(module))
                  if n.endswith("Partitioner") and n not in NOT_ROW_PARTITIONERS)


def partitioner_class(name: str):
    names = partitioner_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"partitioner {name!r} is not a flwr-datasets row partitioner{hint}; valid: "
                          f"{', '.join(names)}")
    return getattr(_module(), name)


def partitioner_kwargs(name: str, options: dict[str, Any], *, clients: int, key: str, alpha: float, seed: int,
                       classes_per_client: int, min_client_size: int) -> dict[str, Any]:
    """The arguments ``name``'s class is built with: ``options`` plus the run's settings for the
    parameters it has and ``options`` leaves out; a ConfigError for an option it does not take."""
    params = inspect.signature(partitioner_class(name)).parameters
    bad = sorted(set(options) - set(params))
    if bad:
        raise ConfigError(f"partitioner_options {bad} are not arguments of {name}; its arguments are "
                          f"{', '.join(params)}")
    given = {"num_partitions": clients, "partition_by": key, "alpha": alpha, "seed": seed,
             "num_classes_per_partition": classes_per_client, "min_partition_size": min_client_size}
    kwargs = {k: v for k, v in given.items() if k in params}
    kwargs.update(options)
    return kwargs


def build_partitioner(name: str, kwargs: dict[str, Any]):
    """The partitioner, or a ConfigError that says which argument is wrong (flwr-datasets' own
    words)."""
    cls = partitioner_class(name)
    try:
        return cls(**kwargs)
    except TypeError as e:
        missing = [p for p, v in inspect.signature(cls).parameters.items()
                   if v.default is inspect.Parameter.empty and p not in kwargs
                   and v.kind not in (v.VAR_POSITIONAL, v.VAR_KEYWORD)]
        if missing:
            raise ConfigError(f"{name} needs {', '.join(missing)}: pass --partitioner-options "
                              f"'{{\"{missing[0]}\": ...}}'") from None
        raise ConfigError(f"{name}({_show(kwargs)}): {e}") from None
    except ValueError as e:
        raise ConfigError(f"{name}({_show(kwargs)}): {' '.join(str(e).split())}") from None


def _show(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def _column(keys: Sequence[Hashable]) -> list:
    """Keys Arrow can hold in one column: as they are when all ints (or all strings), else strings."""
    if all(isinstance(k, int) and not isinstance(k, bool) for k in keys) or all(isinstance(k, str) for k in keys):
        return list(keys)
    return [str(k) for k in keys]


def flwr_partition(keys: Sequence[Hashable], num_clients: int, name: str, options: dict[str, Any] | None = None, *,
                   key: str = "key", alpha: float = 0.5, seed: int = 0, classes_per_client: int = 2,
                   min_client_size: int = 1) -> list[list[int]]:
    """``num_clients`` lists of indices into ``keys`` (sorted), as flwr-datasets' ``name``
    partitions a dataset whose column ``key`` holds ``keys``."""
    import datasets  # noqa: PLC0415 - flwr-datasets depends on it

    if key == INDEX:
        raise ConfigError(f"partition_by {INDEX!r} is fastseq's own column name; rename the column")
    kwargs = partitioner_kwargs(name, dict(options or {}), clients=num_clients, key=key, alpha=alpha, seed=seed,
                                classes_per_client=classes_per_client, min_client_size=min_client_size)
    partitioner = build_partitioner(name, kwargs)
    partitioner.dataset = datasets.Dataset.from_dict({key: _column(keys), INDEX: list(range(len(keys)))})
    try:
        made = partitioner.num_partitions
        if made != num_clients:
            raise ConfigError(f"{name} made {made} partitions"
                              + (f" (one per distinct {key!r})" if "Natural" in name else "")
                              + f" but the run has clients={num_clients}; pass --clients {made}")
        parts = [sorted(int(i) for i in partitioner.load_partition(i)[INDEX]) for i in range(made)]
    except ConfigError:
        raise
    except (ValueError, KeyError, IndexError) as e:
        raise ConfigError(f"{name}({_show(kwargs)}) could not partition {len(keys)} examples: "
                          f"{' '.join(str(e).split())}") from None
    small = [i for i, p in enumerate(parts) if len(p) < min_client_size]
    if small:
        raise ConfigError(f"{name} leaves client(s) {small[:10]} with fewer than min_client_size={min_client_size} "
                          f"examples (sizes {[len(parts[i]) for i in small[:10]]}); lower --min-client-size, use "
                          f"fewer clients or change the partitioner's arguments")
    return parts


def check_partitioner(name: str, options: dict[str, Any], **settings: Any) -> None:
    """What can be checked before any data is loaded: the name, the options and the values the
    class accepts (it is built once, on a stand-in key column name)."""
    build_partitioner(name, partitioner_kwargs(name, options, key=settings.pop("key", "key"), **settings))
