"""Model registry: ``build_model``, ``list_models``, ``register_model``.

Registered: CIFAR ResNet-20/32/44/56/110 (Distiller layer names), VGG-11/16, MobileNetV2 (CIFAR),
``smallcnn`` and the structural-pattern models ``densenet_tiny``, ``resnext_tiny``,
``se_resnet_tiny``, ``mobilenet_tiny``, ``shufflenet_tiny``. User models: ``build_model("package.module:factory", ...)``.
"""

from . import mobilenetv2, patterns, resnet, small, vgg  # noqa: F401  (import registers the models)
from .registry import build_model, list_models, register_model

__all__ = ["build_model", "list_models", "register_model"]
