"""The common machinery of every class-activation-map method.

:class:`CAMMethod` owns the model (put in eval mode), the device, the target layer and the
test-time augmentation; a subclass only says how to compute raw, non-negative maps at
feature resolution for some classes of one normalised image (:meth:`CAMMethod.maps`).

Inference follows IRN (Ahn et al., CVPR 2019, "Weakly Supervised Learning of Instance
Segmentation with Inter-pixel Relations") and ReCAM (Chen et al., CVPR 2022): for every
scale ``s`` in ``params.cam_scales`` the image is resized and its maps, plus the
flipped-back maps of its horizontal mirror when ``params.cam_flip``, are upsampled to the
original size (bilinear, ``align_corners=False``) and summed; each class map is finally
normalised to [0, 1]:

    M_c = sum_{s, f} up_HxW(flip_f(maps(flip_f(resize_s(I))))_c)
    max:    M_c <- M_c / (max M_c + 1e-5)                      (IRN make_cam.py, CAM, Grad-CAM++)
    minmax: M_c <- (M_c - min M_c) / (max M_c - min M_c)       (Score-CAM's code; 0 if constant)

Resize (``params.cam_resize``): ``bicubic`` resizes the uint8 RGB image with PIL's bicubic
filter before normalising, as every official repository does (IRN/ReCAM
``misc/imutils.py`` ``pil_rescale`` with ``resample=Image.BICUBIC``; Puzzle-CAM
``inference_classification.py`` ``resample=PIL.Image.CUBIC``); ``bilinear`` is torch's
bilinear resize of the normalised tensor (this harness before issue 13), kept as an option.

Normalisation (``params.cam_norm``): ``reference`` (default) takes each method's own code's
rule, :attr:`CAMMethod.reference_norm`: Score-CAM's code (haofanwang/Score-CAM
``cam/scorecam.py``) applies ReLU then min-max to its final map, so a map that is positive
everywhere (Score-CAM's softmax weights mix every channel) starts at 0 instead of keeping a
high floor that passes any low threshold; CAM (IRN), Grad-CAM++ (the author's
``misc/utils.py``: ``cam / np.max(cam)``), ReCAM and SIPE divide by the maximum. ``max`` and
``minmax`` force one rule on every method. Since the maps are ReLU'd, min-max equals max
division wherever some pixel of the map is 0.

Target layer: by default the last feature map ``model.features(x)`` (what the classifier's
GAP + 1x1 head reads). A name ``'layer1'``..``'layer4'`` (a stage of ``model.backbone``) or
any ``nn.Module`` of the model may be given instead; its output is captured with a forward
hook that is registered for one forward and removed right after (see
:meth:`CAMMethod.activations_and_logits`).
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import Params, cuda_amp_dtype, resolve_device
from ..models.backbone import normalize

#: Names accepted for ``target_layer``; ``features`` (or None) is the last feature map.
LAYER_NAMES = ("features", "layer1", "layer2", "layer3", "layer4")


def pil_resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An HxWx3 uint8 image resized to ``size`` (H, W) with PIL's bicubic filter, as IRN's
    ``misc/imutils.py`` ``pil_rescale`` (``order=3``) and Puzzle-CAM's ``get_cam`` do."""
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), resample=Image.BICUBIC))


def normalise_maps(maps: torch.Tensor, rule: str) -> torch.Tensor:
    """Per-map normalisation of (n, H, W) non-negative maps: ``max`` divides by max + 1e-5
    (IRN), ``minmax`` maps [min, max] to [0, 1] (Score-CAM's code; a constant map becomes 0)."""
    flat = maps.flatten(1)
    mx = flat.amax(1).view(-1, 1, 1)
    if rule == "max":
        return maps / (mx + 1e-5)
    if rule != "minmax":
        raise ValueError(f"normalisation must be max or minmax (got {rule!r})")
    mn = flat.amin(1).view(-1, 1, 1)
    rng = mx - mn
    return torch.where(rng > 0, (maps - mn) / torch.where(rng > 0, rng, torch.ones_like(rng)), torch.zeros_like(maps))


def _as_index(classes, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(list(classes) if not torch.is_tensor(classes) else classes,
                           dtype=torch.long, device=device).flatten()


class CAMMethod(abc.ABC):
    """A class-activation-map method: model + target layer + multi-scale/flip inference.

    Parameters
    ----------
    model:
        A classifier exposing ``features(x) -> A (B,C,h,w)``, ``head(A) -> logits (B,K)``
        and ``forward(x) = head(features(x))`` (see :class:`wsss.models.classifier.Classifier`).
        It is moved to ``device`` and put in eval mode.
    params:
        Reads ``cam_scales``, ``cam_flip``, ``cam_resize``, ``cam_norm``, ``cam_batch_size``
        and ``device``; defaults to
        ``Params()``.
    target_layer:
        ``None``/``'features'`` (last feature map), ``'layer1'``..``'layer4'`` of
        ``model.backbone``, or an ``nn.Module`` inside the model.
    device:
        Overrides ``params.device``.
    """

    #: Registry name; set by subclasses.
    name: str = "base"
    #: Whether :meth:`maps` needs autograd (then ``__call__`` does not enter inference mode).
    needs_grad: bool = False
    #: How the method's own reference code normalises its final map: ``max`` or ``minmax``
    #: (what ``params.cam_norm: reference`` applies).
    reference_norm: str = "max"

    def __init__(self, model: nn.Module, params: Params | None = None, *,
                 target_layer: str | nn.Module | None = None,
                 device: torch.device | str | None = None):
        self.params = params if params is not None else Params()
        self.device = torch.device(device) if device is not None else resolve_device(self.params.device, self.params.cuda_amp)
        self.model = model.to(self.device).eval()
        self.target_layer = target_layer
        self._layer = self._resolve_layer(target_layer)
        self.resize = self.params.cam_resize  # read here: every scale of 1.0 never resizes

    # ------------------------------------------------------------------ target layer
    def _resolve_layer(self, target_layer) -> nn.Module | None:
        if target_layer is None or target_layer == "features":
            return None
        if isinstance(target_layer, nn.Module):
            return target_layer
        if isinstance(target_layer, str) and target_layer in LAYER_NAMES:
            backbone = getattr(self.model, "backbone", None)
            layer = getattr(backbone, target_layer, None)
            if isinstance(layer, nn.Module):
                return layer
            raise ValueError(f"model has no backbone.{target_layer} to hook")
        raise ValueError(f"target_layer {target_layer!r} unknown; choose from {', '.join(LAYER_NAMES)} "
                         "or pass an nn.Module of the model")

    @contextlib.contextmanager
    def _capture(self, as_leaf: bool) -> Iterator[list[torch.Tensor]]:
        """Register a forward hook on the target layer for the duration of the block.

        With ``as_leaf`` the layer's output is replaced downstream by a detached copy that
        requires grad, so ``autograd.grad(logit, A)`` back-propagates through the layers
        after the target only (and works when the parameters are frozen).
        """
        store: list[torch.Tensor] = []

        def hook(_module, _inputs, output):
            if not torch.is_tensor(output):
                raise TypeError("the target layer must output one tensor")
            if as_leaf:
                output = output.detach().requires_grad_(True)
            store.append(output)
            return output

        handle = self._layer.register_forward_hook(hook)
        try:
            yield store
        finally:
            handle.remove()

    def activations_and_logits(self, x: torch.Tensor, grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Target-layer activations A (B,C,h,w) and logits (B,K) of a normalised batch.

        With ``grad`` A is a leaf that requires grad and the logits are a function of it.
        """
        if self._layer is None:
            if grad:  # only dy/dA is needed: no graph through the trunk
                with torch.no_grad():
                    A = self.model.features(x)
                A = A.detach().requires_grad_(True)
            else:
                A = self.model.features(x)
            return A, self.model.head(A)
        with self._capture(as_leaf=grad) as store:
            logits = self.model(x)
        if len(store) != 1:
            raise RuntimeError(f"target layer ran {len(store)} times in one forward; choose another layer")
        return store[0], logits

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        """Target-layer activations only (the default path skips the head)."""
        if self._layer is None:
            return self.model.features(x)
        return self.activations_and_logits(x)[0]

    @staticmethod
    @contextlib.contextmanager
    def grad_enabled() -> Iterator[None]:
        """Autograd on, even when the caller is inside ``torch.inference_mode()``."""
        with torch.inference_mode(False), torch.enable_grad():
            yield

    # ------------------------------------------------------------------ the method
    @abc.abstractmethod
    def maps(self, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Raw non-negative maps (n, h', w') of ``classes`` (LongTensor (n,), values 0..K-1)
        for one normalised image ``x`` (1, 3, h, w), at the target layer's resolution."""

    def maps_batch(self, x: torch.Tensor, classes: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Raw maps for a batch of same-size images: one (n_b, h', w') tensor per image.

        The default runs :meth:`maps` image by image; subclasses may batch.
        """
        return [self.maps(x[b:b + 1], classes[b]) for b in range(x.shape[0])]

    # ------------------------------------------------------------------ inference
    def __call__(self, image: np.ndarray, classes: Sequence[int]) -> np.ndarray:
        """Normalised CAMs (n, H, W) float32 in [0, 1] of ``classes`` for one RGB uint8 image."""
        return self.cams_batch([image], [classes])[0]

    def cams_batch(self, images: Sequence[np.ndarray], classes: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """:meth:`__call__` for several images.

        Consecutive images of the same size are grouped into batches of at most
        ``params.cam_batch_size`` and handed to :meth:`maps_batch` together; for every method
        but the Score-CAM study variant the result equals calling the images one by one.
        """
        return self._in_groups(images, classes, self._cams_group)

    def _in_groups(self, images: Sequence[np.ndarray], classes: Sequence[Sequence[int]], run) -> list:
        """``run(images, classes)`` over runs of consecutive same-size images, at most
        ``params.cam_batch_size`` at a time; the results concatenated in image order."""
        if len(images) != len(classes):
            raise ValueError(f"{len(images)} images but {len(classes)} class lists")
        out: list = []
        bs = max(1, int(self.params.cam_batch_size))
        i = 0
        while i < len(images):
            j = i + 1
            while j < len(images) and j - i < bs and images[j].shape == images[i].shape:
                j += 1
            out.extend(run(images[i:j], classes[i:j]))
            i = j
        return out

    def _cams_group(self, images: Sequence[np.ndarray], classes: Sequence[Sequence[int]]) -> list[np.ndarray]:
        for im in images:
            if im.ndim != 3 or im.shape[2] != 3:
                raise ValueError(f"expected an HxWx3 RGB image, got shape {im.shape}")
        H, W = images[0].shape[:2]
        idx = [_as_index(c, self.device) for c in classes]
        grad_ctx = contextlib.nullcontext() if self.needs_grad else torch.inference_mode()
        amp_dtype = cuda_amp_dtype(self.device, self.params.cuda_amp)  # CUDA only; maps summed in fp32

        def amp_ctx():
            return torch.autocast("cuda", dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
        with grad_ctx:
            x = self._to_input(images)
            acc = [torch.zeros((len(c), H, W), device=self.device) for c in idx]
            if any(len(c) for c in idx):
                for s in self.params.cam_scales:
                    size = (max(1, round(H * s)), max(1, round(W * s)))
                    xs = self._resized(images, x, size)
                    flips = (False, True) if self.params.cam_flip else (False,)
                    for flip in flips:
                        inp = xs.flip(-1) if flip else xs
                        with amp_ctx():
                            maps = self.maps_batch(inp, idx)
                        for b, m in enumerate(maps):
                            if m.shape[0] == 0:
                                continue
                            m = m.detach().float()
                            if flip:
                                m = m.flip(-1)
                            acc[b] += F.interpolate(m[None], size=(H, W), mode="bilinear",
                                                    align_corners=False)[0]
            result = []
            for a in acc:
                if a.shape[0]:
                    a = normalise_maps(a, self.norm)
                result.append(a.cpu().numpy().astype(np.float32, copy=False))
        return result

    @property
    def norm(self) -> str:
        """The normalisation applied: ``params.cam_norm``, or the method's reference rule."""
        norm = self.params.cam_norm
        return self.reference_norm if norm == "reference" else norm

    def _to_input(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        arr = np.stack([np.ascontiguousarray(im) for im in images])
        x = torch.from_numpy(arr).to(self.device).permute(0, 3, 1, 2).float().div_(255.0)
        return normalize(x)

    def _resized(self, images: Sequence[np.ndarray], x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """The normalised batch at ``size`` (H, W): PIL bicubic on the uint8 images (the official
        repositories' ``pil_rescale``) or torch bilinear on ``x``, per ``params.cam_resize``."""
        if size == tuple(x.shape[-2:]):
            return x
        if self.resize == "bicubic":
            return self._to_input([pil_resize(im, size) for im in images])
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    def __repr__(self) -> str:
        layer = self.target_layer if isinstance(self.target_layer, str) or self.target_layer is None \
            else type(self.target_layer).__name__
        return f"{type(self).__name__}(target_layer={layer or 'features'!r}, device={str(self.device)!r})"
