"""Which engine runs an experiment: ``run(cfg)`` dispatches on ``cfg.engine``.

* ``local``: :func:`fastseq.fed.engine.run_experiment` (one process, one shared backbone);
* ``flower``: :func:`fastseq.flower.run_flower` (a SuperLink and one SuperNode per client);
* ``flower-sim``: :func:`fastseq.flower.run_flower_simulation` (Flower's Simulation Engine,
  Ray actors as virtual SuperNodes).

This module sits above ``fastseq.fed`` and ``fastseq.flower`` so that ``fed`` never imports
``flower`` (the Flower engines run ``fed``'s round loop, not the other way round).
"""

from __future__ import annotations

import importlib.util
from typing import Any, Callable

from .config import ConfigError
from .fed.experiment import ENGINES, ExperimentConfig

__all__ = ["ENGINES", "run"]


def _require(module: str, extra: str, engine: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"engine {engine!r} needs {module}, which is not installed; "
                          f'pip install "fastseq[{extra}]" (or use --engine local)')


def run(cfg: ExperimentConfig, *, resume: bool = False, echo: Callable[[str], None] | None = None,
        **kwargs: Any) -> dict[str, Any]:
    """Run (or resume) ``cfg`` on the engine it names; returns the run's summary. Raises
    :class:`fastseq.fed.engine.NothingTrained` (after the run's files are written) when no round
    aggregated a client update, on every engine.

    ``kwargs`` go to the engine's runner (e.g. ``hooks``/``client_factory`` for local,
    ``superlink``/``timeout`` for flower, ``ray_init_args`` for flower-sim)."""
    from .fed.engine import check_trained

    summary = _run_engine(cfg, resume, echo, kwargs)
    check_trained(summary)
    return summary


def _run_engine(cfg: ExperimentConfig, resume: bool, echo: Callable[[str], None] | None,
                kwargs: dict[str, Any]) -> dict[str, Any]:
    kw = dict(kwargs)
    if echo is not None:
        kw["echo"] = echo
    if cfg.engine == "local":
        from .fed.engine import run_experiment

        return run_experiment(cfg, resume=resume, **kw)
    if cfg.engine == "flower":
        _require("flwr", "flower", "flower")
        try:
            from .flower import run_flower
        except ImportError as e:
            raise ConfigError(f"engine 'flower' needs fastseq.flower.run_flower, which is not available in this "
                              f"installation ({e}); use --engine local") from None
        return run_flower(cfg, resume=resume, **kw)
    if cfg.engine == "flower-sim":
        _require("flwr", "flower-sim", "flower-sim")
        _require("ray", "flower-sim", "flower-sim")
        from .flower import run_flower_simulation

        return run_flower_simulation(cfg, resume=resume, **kw)
    raise ConfigError(f"engine={cfg.engine!r} is not valid; valid values: {', '.join(ENGINES)}")
