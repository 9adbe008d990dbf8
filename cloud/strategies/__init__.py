"""Aggregation strategies the cloud applies to client updates at the end of a federated round."""

from cloud.strategies.base import ClientUpdate, Params, Strategy, validate_update
from cloud.strategies.fedavg import FedAvg
from cloud.strategies.fedavgm import FedAvgM
from cloud.strategies.fedopt import FedAdam, FedYogi
from cloud.strategies.fedprox import FedProx
from cloud.strategies.median import Median
from cloud.strategies.registry import STRATEGIES, get_strategy, register_strategy
from cloud.strategies.trimmed_mean import TrimmedMean

__all__ = [
    "STRATEGIES",
    "ClientUpdate",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedProx",
    "FedYogi",
    "Median",
    "Params",
    "Strategy",
    "TrimmedMean",
    "get_strategy",
    "register_strategy",
    "validate_update",
]
