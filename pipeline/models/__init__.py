"""The paper's networks as pure ``nn.Module``s, built by name.

    from pipeline.models import MODEL_NAMES, build_model, count_macs
    model = build_model(cfg.model)          # cfg = pipeline.config.load_config(...)

``python -m pipeline models [--json]`` lists every registered model with its parameters
and multiply-adds.
"""

from pipeline.models.cifar import CifarResNet, cifar_resnet
from pipeline.models.registry import (
    MODEL_NAMES,
    REGISTRY,
    ModelSpec,
    build_model,
    count_macs,
    count_params,
    create_model,
    model_spec,
    native_input_size,
    summarize,
)
from pipeline.models.resnet import BasicBlock, Bottleneck, ResNet, from_torchvision_state_dict, resnet

__all__ = [
    "MODEL_NAMES",
    "REGISTRY",
    "BasicBlock",
    "Bottleneck",
    "CifarResNet",
    "ModelSpec",
    "ResNet",
    "build_model",
    "cifar_resnet",
    "count_macs",
    "count_params",
    "create_model",
    "from_torchvision_state_dict",
    "model_spec",
    "native_input_size",
    "resnet",
    "summarize",
]
