"""fastcifar: ResNetV2-20 on CIFAR-10, fed by FFCV loaders that augment on the device."""

__version__ = "0.1.0"
