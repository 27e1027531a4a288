"""Flower server side: one Strategy subclass per aggregation family, and the ServerApp."""

from strategies.fedavg import FedAvgStrategy

# method name (conf/method/<name>.yaml) -> strategy class
STRATEGIES = {
    "fedavg": FedAvgStrategy,
}
