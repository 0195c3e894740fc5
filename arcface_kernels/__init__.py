"""arcface-kernels: fused margin-softmax (ArcFace / CosFace / SphereFace) losses that never
hold the N x C logits. See README.md, and docs/design.md for the math and the design."""
from ._config import LossOptions, MarginConfig
from ._version import __version__
from .backends import available_backends, backend_status
from .linear import linear_cross_entropy
from .loss import ArcFaceFunction, LossStats, arcface_loss
from .module import ArcFaceLoss
from .partial_fc import PartialFC
from .reference import reference_loss

__all__ = ["arcface_loss", "linear_cross_entropy", "ArcFaceFunction", "ArcFaceLoss", "PartialFC", "LossOptions",
           "LossStats", "MarginConfig", "available_backends", "backend_status",
           "reference_loss", "__version__"]
