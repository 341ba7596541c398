"""fastcifar: ResNetV2-20 on CIFAR-10, fed by FFCV loaders that augment on the device."""

try:
    import distutils  # noqa: F401  (ffcv 1.0.2 imports distutils.log)
except ImportError:  # Python 3.12+ dropped distutils; importing setuptools installs its shim
    try:
        import setuptools  # noqa: F401
    except ImportError:
        pass  # then importing ffcv fails, and says so

__version__ = "0.1.0"
