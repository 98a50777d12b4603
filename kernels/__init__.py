"""GPU preprocessing: the CUDA kernel in ``preprocess.cu``, compiled with nvcc on first use, driven by pycuda.

A leaf package (it imports only ``i2p.base``): it compiles and launches the kernel on plain arrays.
The caller (``i2p.runtime``) computes Pillow's fixed-point filter tables and passes them in, so the
kernel does only integer arithmetic plus one IEEE float32 normalization and matches the CPU
reference bit for bit (``preprocess.cu`` explains the arithmetic).

- ``build``: nvcc, the architectures it supports, ptxas reports, the cubin cache
- ``layout``: packing pixels, descriptors and tables for one launch; the launch shape
- ``cuda``: pycuda (optional, imported lazily), the primary context
- ``preprocessor``: ``GpuPreprocessor``, staging buffers and the launch on one stream
"""

from .compiler import (
    SOURCE,
    KernelBuildError,
    KernelResources,
    cache_dir,
    compile_kernels,
    find_nvcc,
    nvcc_compile,
    parse_ptxas_report,
    source_sha256,
    supported_archs,
)
from .cuda import activated, available, compute_capability, driver, free_pinned, primary_context
from .layout import (
    BLOCK,
    DESC_FIELDS,
    KERNELS,
    MAX_BATCH,
    BatchLayout,
    ImageTables,
    check_images,
    launch_shape,
    pack_sources,
    plan_batch,
)
from .preprocessor import GpuPreprocessor

__all__ = [
    "BLOCK",
    "DESC_FIELDS",
    "KERNELS",
    "MAX_BATCH",
    "SOURCE",
    "BatchLayout",
    "GpuPreprocessor",
    "ImageTables",
    "KernelBuildError",
    "KernelResources",
    "activated",
    "available",
    "cache_dir",
    "check_images",
    "compile_kernels",
    "compute_capability",
    "driver",
    "find_nvcc",
    "free_pinned",
    "launch_shape",
    "nvcc_compile",
    "pack_sources",
    "parse_ptxas_report",
    "plan_batch",
    "primary_context",
    "source_sha256",
    "supported_archs",
]
