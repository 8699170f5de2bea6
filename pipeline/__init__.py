"""Distributed ResNet training on ImageNet and CIFAR-10 (He et al. 2015) with Ray Train, DALI and W&B."""

__version__ = "0.1.0"
