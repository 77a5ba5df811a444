"""The Flower engine: fastseq's ServerApp/ClientApp (``fastseq.flower.app``) and
``run_flower(cfg)`` (a local loopback deployment, or submission to an existing SuperLink).

Importing this package does not import flwr; ``fastseq.flower.app`` does.
"""

from .deploy import FlowerError, LocalDeployment, run_flower

__all__ = ["FlowerError", "LocalDeployment", "run_flower"]
