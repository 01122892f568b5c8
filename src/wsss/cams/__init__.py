"""Class activation maps: CAM, ReCAM, Grad-CAM, Grad-CAM++, Score-CAM (+ SIPE elsewhere).

``get_method(name, model, params)`` returns a :class:`CAMMethod`; calling it on an RGB
uint8 image and a list of class indices gives normalised maps (n, H, W) in [0, 1].
"""

from .base import CAMMethod
from .cam import CAM, ReCAM
from .gradcam import GradCAM
from .gradcampp import GradCAMPlusPlus
from .registry import Method, get_method, method_names, register_method
from .scorecam import ScoreCAM, ScoreCAMReference, scorecam_batch, study_scorecam_batch

__all__ = [
    "CAMMethod", "CAM", "ReCAM", "GradCAM", "GradCAMPlusPlus", "ScoreCAM", "ScoreCAMReference",
    "scorecam_batch", "study_scorecam_batch", "Method", "get_method", "method_names",
    "register_method",
]
