"""fastseq.fed: federated runtime (methods, partitioners, client, server, server optimizers,
the embedded ``local`` engine, checkpoints). See docs/federated.md.

Client and server exchange only ``fastseq.comm`` blobs (bytes), so the same classes run
under the embedded engine and under Flower.
"""

from .client import Client, TrainConfig, derive_seed
from .engine import Hooks, latest_checkpoint, run_experiment
from .experiment import ExperimentConfig, Runtime, build_client, build_runtime, build_server, load_config_file
from .methods import Method, get_method, list_methods, register_method
from .partition import dirichlet_partition, iid_partition, partition, pathological_partition
from .server import Server, ServerConfig
from .server_opt import ServerOptimizer

__all__ = [
    "Client", "ExperimentConfig", "Hooks", "Method", "Runtime", "Server", "ServerConfig", "ServerOptimizer",
    "TrainConfig", "build_client", "build_runtime", "build_server", "derive_seed", "dirichlet_partition",
    "get_method", "iid_partition", "latest_checkpoint", "list_methods", "load_config_file", "partition",
    "pathological_partition", "register_method", "run_experiment",
]
