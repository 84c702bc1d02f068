"""Build the native CPU kernels (plain C, loaded with ctypes; no PyTorch C++ API).

Everything else about the package is in pyproject.toml. The library is compiled for the
baseline x86-64 / aarch64 target: SIMD code paths carry their own target pragmas and are
chosen at run time from what the CPU reports.
"""

from setuptools import Extension, setup

# The binding is the package turbollm.kernels.native; its C is in csrc/ (portable code) and
# csrc/arch/x86/ (AVX2 and AVX-512 VNNI code), ggml-cpu's split. Only the compiled library
# goes into a wheel; the sources and headers go into an sdist (setuptools adds an Extension's
# sources and depends).
CSRC = "src/turbollm/kernels/native/csrc/"
SOURCES = ["api.c", "threads.c", "scalar.c", "arch/x86/avx2.c", "arch/x86/vnni.c", "ops.c", "gemma_blocks.c", "kv.c",
           "abi.c"]
HEADERS = ["tl.h", "tl_internal.h", "arch/x86/x86_simd.h", "arch/x86/eight_blocks.h"]

setup(
    ext_modules=[
        Extension(
            "turbollm.kernels.native._tlnative",
            sources=[CSRC + name for name in SOURCES],
            depends=[CSRC + name for name in HEADERS],
            # -ffp-contract=off: no silent fused multiply-adds, so dequantization stays bit-exact;
            # -fno-trapping-math: nothing here reads floating-point exception flags, and without it
            # GCC will not vectorize a loop with a float select (ops.c's gelu_mul); values unchanged
            extra_compile_args=["-O3", "-std=gnu11", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math",
                                "-pthread", "-Wall"],
            extra_link_args=["-pthread"],
            libraries=["m"],
        )
    ],
)
