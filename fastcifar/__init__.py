"""fastcifar: ResNetV2-20 on CIFAR-10, fed by FFCV loaders that augment on the device."""

import os

# torch's CPU allocator puts tensors of 2 MB and more in transparent huge pages (madvise) when this is
# set before its first allocation: here, before any fastcifar command loads torch. Why, measured on a
# 2-core CPU (docs/benchmarks.md, "Options for the compiled CPU step" and the end-to-end tables' page
# faults): without it glibc returned the step's large activations to the kernel and faulted them in
# again 4 KB at a time, by an amount that varied from process to process; with it the compute-only step
# was faster in every process. THP_MEM_ALLOC_ENABLE=0 opts out.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

try:
    import distutils  # noqa: F401  (ffcv 1.0.2 imports distutils.log)
except ImportError:  # Python 3.12+ dropped distutils; importing setuptools installs its shim
    try:
        import setuptools  # noqa: F401
    except ImportError:
        pass  # then importing ffcv fails, and says so

__version__ = "0.1.0"
