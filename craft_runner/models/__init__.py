"""Models: a timm factory with checkpoint loading, CIFAR models registered in timm, and SNT transforms.

Importing this package registers ``resnet20``, ``mobilenetv1_cifar`` and ``mixer_s_cifar`` in timm.
"""

from craft_runner.models import cifar  # noqa: F401  (registers the CIFAR models in timm)
from craft_runner.models.factory import (
    CIFAR_MODELS,
    CheckpointError,
    check_model_name,
    create_model,
    load_checkpoint,
    model_data_config,
    read_state_dict,
)
from craft_runner.models.snt import RPReLU, apply_snt

__all__ = ["CIFAR_MODELS", "CheckpointError", "check_model_name", "create_model", "load_checkpoint",
           "model_data_config", "read_state_dict", "RPReLU", "apply_snt"]
