"""Dataset constants, the one place for them (mean/std, PCA lighting, crop sizes, test scales).

Values on the 0-255 scale unless a name says otherwise, because DALI and the CIFAR tensors
work on uint8-ranged floats.
"""

from __future__ import annotations

# ImageNet per-channel RGB mean and std (torchvision's 0.485/0.456/0.406 and 0.229/0.224/0.225, x255).
IMAGENET_MEAN: tuple[float, float, float] = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD: tuple[float, float, float] = (0.229 * 255, 0.224 * 255, 0.225 * 255)

# AlexNet PCA colour augmentation ("Lighting"), the values fb.resnet.torch uses. They were
# computed on 0-1 RGB pixels, so the noise eigvec @ (alpha * eigval) is multiplied by
# PCA_SCALE before it is added to 0-255 pixels.
PCA_EIGVAL: tuple[float, float, float] = (0.2175, 0.0188, 0.0045)
PCA_EIGVEC: tuple[tuple[float, float, float], ...] = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)
PCA_SCALE: float = 255.0

# The paper's ImageNet protocol (He et al. 2015, sec. 3.4).
TRAIN_SCALE_RANGE: tuple[int, int] = (256, 480)  # shorter side, uniform
CROP_SIZE: int = 224
VAL_RESIZE: int = 256  # shorter side before the 224 centre / ten crops
TEST_SCALES: tuple[int, ...] = (224, 256, 384, 480, 640)  # fully-convolutional multi-scale test
NUM_TEN_CROPS: int = 10

# Files the ImageNet layout scan accepts (lower-cased suffixes).
IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpeg", ".jpg"})

# CIFAR-10 (sec. 4.2): 32x32, 4-pixel zero pad + random 32 crop + flip, 45k/5k split.
CIFAR_IMAGE_SIZE: int = 32
CIFAR_PAD: int = 4
CIFAR_NUM_CLASSES: int = 10
CIFAR_NUM_TRAIN: int = 50_000
CIFAR_NUM_TEST: int = 10_000
CIFAR_PAPER_VAL_SPLIT: int = 5_000
CIFAR_DIRNAME: str = "cifar-10-batches-py"
# The commonly quoted per-channel CIFAR-10 statistics (0-255). The loader computes the exact
# statistics from whatever training set it reads; these are for reference and for tools.
CIFAR_MEAN: tuple[float, float, float] = (0.4914 * 255, 0.4822 * 255, 0.4465 * 255)
CIFAR_STD: tuple[float, float, float] = (0.2470 * 255, 0.2435 * 255, 0.2616 * 255)
CIFAR_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
# Fixed seed for the held-out validation split, so every run and every rank holds out the same images.
CIFAR_SPLIT_SEED: int = 20151210  # the paper's arXiv date
