"""arcface-kernels: fused margin-softmax (ArcFace / CosFace / SphereFace) losses that never
hold the N x C logits. See README.md, and reference.py for the math."""
from ._config import MarginConfig
from .backends import available_backends, backend_status
from .loss import LossStats, arcface_loss
from .module import ArcFaceLoss
from .partial_fc import PartialFC
from .reference import reference_loss

__version__ = "0.1.0"

__all__ = ["arcface_loss", "ArcFaceLoss", "PartialFC", "available_backends", "backend_status",
           "LossStats", "MarginConfig", "reference_loss", "__version__"]
