"""minblip: BLIP and BLIP-2 from scratch in NumPy, with hand-written backprop.

BLAS threads: minblip's matrices are small, and on two cores a second OpenBLAS
thread mostly waits for the first; when anything else runs on the machine it
makes a training step several times slower. So importing minblip before NumPy
selects one BLAS thread, unless ``OPENBLAS_NUM_THREADS`` is already set. (Once
NumPy is loaded the setting can no longer change, so a program that imports
NumPy first keeps its own choice.)
"""
import os
import sys

if "numpy" not in sys.modules:
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from .core import Module, Param  # noqa: E402
from .gradcheck import GradcheckError, check_layer, gradcheck, rel_error  # noqa: E402

__all__ = ["Module", "Param", "GradcheckError", "check_layer", "gradcheck", "rel_error"]
__version__ = "0.1.0"
