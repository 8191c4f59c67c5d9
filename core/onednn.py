"""Keep MindSpore's CPU convolutions on a fast oneDNN path.

MindSpore 2.10's CPU kernels hand oneDNN plain NCHW tensors. On AVX-512 machines oneDNN then
picks `jit_uni_ncsp:conv+ref`, a reference convolution: measured here (AMD EPYC with AVX-512),
a 64->64 3x3 conv on 8x64x16x16 took 276 ms, against 2.9 ms through the `gemm:jit` path that
oneDNN selects when its instruction set is capped at AVX2. oneDNN reads the cap once, when it
creates its first primitive (set after `import mindspore` it still applies; measured with
ONEDNN_VERBOSE), so `training.model.HRNet` and the MindSpore serving backend call this before
their first op, and importing a package changes nothing. A value the user set is left alone.
"""

from __future__ import annotations

import os

ISA_VARIABLE = "ONEDNN_MAX_CPU_ISA"
FAST_ISA = "AVX2"


def cap_onednn_isa() -> None:
    os.environ.setdefault(ISA_VARIABLE, FAST_ISA)
