"""What a run needs beyond a valid config, checked before Ray starts: the data set on the disk, data
enough for the partitions, and a model that the method can be applied to (a factorization that fits
its layers, adapter targets that name some of them, a model path that loads)."""

from __future__ import annotations

from omegaconf import DictConfig

from fedlora import dp
from fedlora.data import check_dataset
from fedlora.federated_data import federated_data
from fedlora.methods import make_method


def preflight(cfg: DictConfig) -> None:
    """Raise a FedloraError (ConfigError or DataError) that says what is wrong; the work done here
    (decoded data, partitions, the pretrained model read) is kept for the run in this process."""
    check_dataset(cfg)
    model = make_method(cfg).initial_model()
    if dp.client_side(cfg):
        dp.check_model(model)
    federated_data(cfg)  # after the model: a text data set is tokenized with the model's tokenizer
