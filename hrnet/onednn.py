"""Keep MindSpore's CPU convolutions on a fast oneDNN path.

MindSpore 2.10's CPU kernels hand oneDNN plain NCHW tensors. On AVX-512 machines oneDNN then
picks `jit_uni_ncsp:conv+ref`, a reference convolution: measured here (AMD EPYC with AVX-512),
a 64->64 3x3 conv on 8x64x16x16 took 276 ms, against 2.9 ms through the `gemm:jit` path that
oneDNN selects when its instruction set is capped at AVX2. The cap must be in the environment
before the first oneDNN primitive is created, so every entry point that may run MindSpore calls
this before its first MindSpore op. A value the user set explicitly is left alone.
"""

from __future__ import annotations

import os

ISA_VARIABLE = "ONEDNN_MAX_CPU_ISA"
FAST_ISA = "AVX2"


def cap_onednn_isa() -> None:
    os.environ.setdefault(ISA_VARIABLE, FAST_ISA)
