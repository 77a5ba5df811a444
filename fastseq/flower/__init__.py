"""The Flower engines: fastseq's ServerApp/ClientApp (``fastseq.flower.app``),
``run_flower(cfg)`` (a local loopback deployment, or submission to an existing SuperLink) and
``run_flower_simulation(cfg)`` (the same apps on Flower's Simulation Engine).

Importing this package imports neither flwr nor ray; ``fastseq.flower.app`` imports flwr.
"""

from .deploy import FlowerError, LocalDeployment, run_flower
from .simulation import run_flower_simulation

__all__ = ["FlowerError", "LocalDeployment", "run_flower", "run_flower_simulation"]
