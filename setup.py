"""Build the native CPU kernels (plain C, loaded with ctypes; no PyTorch C++ API).

Everything else about the package is in pyproject.toml. The library is compiled for the
baseline x86-64 / aarch64 target: SIMD code paths carry their own target pragmas and are
chosen at run time from what the CPU reports.
"""

from setuptools import Extension, setup

NATIVE = "src/turbollm/kernels/native/"

setup(
    ext_modules=[
        Extension(
            "turbollm.kernels._tlnative",
            sources=[NATIVE + name for name in ("api.c", "threads.c", "scalar.c", "avx2.c", "vnni.c", "ops.c", "blocks.c", "kv.c")],
            depends=[NATIVE + name for name in ("tl.h", "x86_simd.h", "eight_blocks.h")],
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
