"""minblip: BLIP and BLIP-2 from scratch in NumPy, with hand-written backprop."""
from .core import Module, Param
from .gradcheck import GradcheckError, check_layer, gradcheck, rel_error

__all__ = ["Module", "Param", "GradcheckError", "check_layer", "gradcheck", "rel_error"]
__version__ = "0.1.0"
