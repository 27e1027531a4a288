"""What a run needs beyond a valid config, checked before Ray starts: the data set on the disk, data
enough for the partitions, and a model that the method can be applied to (a factorization that fits
its layers, adapter targets that name some of them, a model path that loads)."""

from __future__ import annotations

from omegaconf import DictConfig

from fedlora import dp
from fedlora.data import check_dataset, dataset_info, load_test
from fedlora.errors import DataError
from fedlora.federated_data import federated_data
from fedlora.methods import make_method
from fedlora.models import MODELS


def preflight(cfg: DictConfig) -> None:
    """Raise a FedloraError (ConfigError or DataError) that says what is wrong; the work done here
    (decoded data, partitions) is kept for the run in this process."""
    check_dataset(cfg)
    if cfg.dataset.name == "hf" and cfg.dataset.get("image") and cfg.adapter is None:  # a paper CNN: of their shape
        shape, wants = dataset_info(cfg).shape, MODELS[cfg.model.name].input_shape
        if shape != wants:
            raise DataError(f"dataset.path={cfg.dataset.path}: images of shape {shape} (channels, height, width), "
                            f"and model={cfg.model.name} takes {wants}: leave model=auto, or set "
                            "dataset.image_size (the channels follow the images: grey or RGB)")
    model = make_method(cfg).initial_model()
    if dp.client_side(cfg):
        dp.check_model(model)
    if cfg.model.get("packing"):
        from fedlora.causal import check_packing

        check_packing(model, cfg.model.hf)
    if cfg.data.get("on_nodes"):  # the nodes bring their training data: the server's test split alone,
        load_test(cfg)  # decoded into the disk cache (the server makes its tensors once, as it starts)
    else:
        federated_data(cfg)  # after the model: a text data set is tokenized with the model's tokenizer
