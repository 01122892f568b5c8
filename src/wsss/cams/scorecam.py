"""Score-CAM: channel weights from the class score of the image masked by each channel.

Score-CAM (Wang et al., "Score-CAM: Score-Weighted Visual Explanations for Convolutional
Neural Networks", CVPR Workshops 2020). For the target-layer activations A (C, h, w) of a
normalised image X (3, H, W):

    H_k   = s(up(A_k)),  s(M) = (M - min M) / (max M - min M)     (mask of channel k at input size)
    S_ck  = f_c(X * H_k) - f_c(X_b)                                ("increase of confidence")
    a_c   = softmax_k(S_ck)          (``weights='softmax'``, the paper's Eq.)
    M_c   = ReLU( sum_k a_ck A_k )

``up`` is bilinear with ``align_corners=False``. X_b is the all-zero normalised image,
i.e. the ImageNet-mean image, which is also what X * H_k shows where H_k = 0; with
``baseline=False`` the score is f_c(X * H_k) alone. Note: f_c(X_b) is the same for every
channel k, and the softmax over channels is invariant to a per-class shift, so the
baseline does not change a_c or M_c (only float round-off); it is kept because the paper
defines the score that way (and an unnormalised use of S would need it). It costs one
forward per image.

Score f_c. The classifier is multi-label (sigmoid / multilabel soft-margin), so the
default is the sigmoid probability f_c = sigmoid(y_c), the multi-label counterpart of the
paper's softmax probability. ``score='logit'`` uses the raw logit y_c, as the
``grad-cam`` package (pytorch-grad-cam, ``ClassifierOutputTarget``) does. Note that with
sigmoid scores in [0, 1] (differences in [-1, 1]) the softmax over channels is close to
uniform (weights within a factor e^2 of each other); the logit gives sharper weights.

Channel weights. ``weights='softmax'`` (default) is the paper's: a softmax over the channels
of the increases of confidence. ``weights='linear'`` is what the authors' released code does
(haofanwang/Score-CAM, cam/scorecam.py, the loop over channels: ``score * saliency_map``
summed): the score itself is the weight, a_ck = S_ck, with no softmax over channels. There
f_c is the softmax probability over the classes of the masked image and nothing is
subtracted; here f_c is ``score`` (sigmoid for the multi-label classifier) and the baseline
follows ``baseline`` (set ``baseline=False`` for the authors' code; with linear weights the
baseline does change the maps). The authors sum the *upsampled* maps then apply ReLU; this
module applies ReLU at feature resolution and the base class upsamples after (the same as
for the softmax weights; bilinear upsampling and the weighted sum commute, ReLU and the
upsampling do not, exactly, at the edges of the positive region).

Constant channels. Where A_k is constant (max == min, e.g. a dead ReLU channel) the mask
s(up(A_k)) is 0/0, undefined. Such channels are skipped: S_ck = -inf, so a_ck = 0 (the
original Score-CAM code skips them too). If every channel is constant all maps are zero.

Implementations
---------------
:class:`ScoreCAM` (fast, the default): one pass over the channels of an image scores every
requested class at once (the n class columns of each masked forward are read together),
masked images are built and forwarded ``chunk`` channels at a time so peak memory is
bounded by the chunk and does not grow with C, constant channels are never forwarded;
``torch.inference_mode``; the masked batches and the weights are channels_last (on CPU too:
oneDNN runs ResNet-18 about 1.3x faster that way, same float32 values); on CUDA also under
``torch.autocast`` (bfloat16 where supported, else float16; scores, softmax and the weighted
sum stay float32).

:class:`ScoreCAMReference`: the same math as a plain loop (for every class, for every
channel, one forward of one masked image). For tests only.

:func:`scorecam_batch`: the per-image (correct) Score-CAMs of a batch for each image's
present classes, raw, at feature resolution, without grad; for training stages that use
Score-CAMs as masks (ReCAM + Score-CAM).

Study variant (``params.scorecam_variant == 'study'``)
-----------------------------------------------------
:func:`study_scorecam_batch` replays the student project's implementation, to reproduce
its numbers. It differs from the correct version in exactly three ways:

1. no baseline: S_ck = f_c(X * H_k), nothing subtracted (by itself no change of the maps,
   see above: the softmax over channels removes any per-class constant);
2. the scores come from batch item 0 only: for every channel k the whole batch is masked
   (each image by its own normalised A_k) and forwarded, but the logits of item 0 are read
   and the resulting weights a_c are applied to the activations of *every* image of the
   batch (the bug of reading ``output[0]`` in code written for batch size 1). For item 0
   the result is therefore the correct Score-CAM without baseline; for items 1.. it is
   the weighted sum of their own activations with item 0's weights;
3. f_c is the raw logit y_c (softmax over channels of raw logits), not the sigmoid.

Channels constant in item 0 are skipped (weight 0 for the whole batch); a channel constant
in another image gets an all-zero mask there. Per image (``__call__`` on a single image)
the study variant equals the correct one with ``baseline=False, score='logit'``; the batch
effect appears through :meth:`ScoreCAM.cams_batch` (batches of ``params.cam_batch_size``
images of equal size) or :func:`study_scorecam_batch`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Params
from .base import CAMMethod

SCORES = ("sigmoid", "logit")
VARIANTS = ("correct", "study")
WEIGHTS = ("softmax", "linear")


def _check_score(score: str, weights: str = "softmax") -> None:
    if score not in SCORES:
        raise ValueError(f"score must be one of {', '.join(SCORES)} (got {score!r})")
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHTS)} (got {weights!r})")


def _score(logits: torch.Tensor, score: str) -> torch.Tensor:
    logits = logits.float()
    return torch.sigmoid(logits) if score == "sigmoid" else logits


def _autocast(device: torch.device, cuda_autocast: bool) -> contextlib.AbstractContextManager:
    """bfloat16 (else float16) autocast on CUDA when ``cuda_autocast``; on CPU nothing."""
    if cuda_autocast and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def _layout(batch: torch.Tensor, channels_last: bool) -> torch.Tensor:
    # channels_last helps on CPU too (oneDNN: ~1.3x for ResNet-18 at 96 px, same values)
    if channels_last:
        return batch.contiguous(memory_format=torch.channels_last)
    return batch


def _min_max(up: torch.Tensor) -> torch.Tensor:
    """Normalise each map of (..., H, W) to [0, 1]; an all-constant map becomes 0."""
    flat = up.flatten(-2)
    mn = flat.amin(-1)[..., None, None]
    rng = flat.amax(-1)[..., None, None] - mn
    return torch.where(rng > 0, (up - mn) / torch.where(rng > 0, rng, torch.ones_like(rng)),
                       torch.zeros_like(up))


def _non_constant(A1: torch.Tensor) -> torch.Tensor:
    """Indices of the channels of A1 (C, h, w) that are not constant."""
    flat = A1.flatten(1)
    return (flat.amax(1) > flat.amin(1)).nonzero().flatten()


def channel_weights(scores: torch.Tensor, weights: str = "softmax") -> torch.Tensor:
    """a (C, n) from the channel scores S (C, n), -inf on constant channels: softmax_k(S) (the
    paper) or S itself (``linear``, the authors' code), 0 on constant channels either way."""
    if weights == "linear":
        return torch.where(torch.isfinite(scores), scores, torch.zeros_like(scores))
    return torch.softmax(scores, dim=0)


def _combine(A1: torch.Tensor, scores: torch.Tensor, weights: str = "softmax") -> torch.Tensor:
    """ReLU(sum_k a_kc A_k), a = :func:`channel_weights`: (C, h, w), (C, n) -> (n, h, w)."""
    if not torch.isfinite(scores).any():  # every channel constant: nothing to weight
        return A1.new_zeros((scores.shape[1], *A1.shape[1:]), dtype=torch.float32)
    w = channel_weights(scores, weights)
    return F.relu(torch.einsum("kn,khw->nhw", w, A1.float()))


def scorecam_scores(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, A: torch.Tensor,
                    classes: torch.Tensor, chunk: int, baseline: torch.Tensor | None = None,
                    score: str = "sigmoid", channels_last: bool = True,
                    cuda_autocast: bool = True) -> torch.Tensor:
    """Score-CAM channel scores S (C, n) of one image for all ``classes`` in one pass.

    ``forward`` maps a normalised batch to logits; ``x`` (1,3,H,W); ``A`` (1,C,h,w);
    ``baseline`` the (n,) scores of the baseline image or None. Channels are processed
    ``chunk`` at a time: the masked inputs of one chunk (chunk,3,H,W) are the only large
    tensors alive. Constant channels get -inf. Call under no_grad/inference_mode.
    """
    C = A.shape[1]
    H, W = x.shape[-2:]
    scores = torch.full((C, classes.numel()), float("-inf"), device=x.device)
    valid = _non_constant(A[0])
    chunk = max(1, int(chunk))
    with _autocast(x.device, cuda_autocast):
        for i in range(0, valid.numel(), chunk):
            idx = valid[i:i + chunk]
            up = F.interpolate(A[:, idx].float(), size=(H, W), mode="bilinear", align_corners=False)[0]
            masked = _layout(x * _min_max(up)[:, None], channels_last)  # (m, 3, H, W)
            s = _score(forward(masked)[:, classes], score)
            scores[idx] = s - baseline if baseline is not None else s
    return scores


class ScoreCAM(CAMMethod):
    """Score-CAM, fast path (one pass over channels for all classes, chunked).

    Wang et al., "Score-CAM: Score-Weighted Visual Explanations for Convolutional Neural
    Networks", CVPR Workshops 2020.

        H_k = minmax(up(A_k)),   S_ck = f_c(X * H_k) - f_c(X_b),
        a_c = softmax_k(S_c),    M_c = ReLU( sum_k a_ck A_k )

    (``weights='linear'``: a_ck = S_ck, the authors' code.) f_c = sigmoid(y_c) (``score='sigmoid'``, multi-label) or y_c (``score='logit'``);
    X_b the zero (mean) image when ``baseline`` (else nothing is subtracted); constant
    channels get a_ck = 0. See the module docstring for details and the 'study' variant.

    Options default to ``params.scorecam_chunk``, ``params.scorecam_baseline``,
    ``params.scorecam_score``, ``params.scorecam_weights`` and ``params.scorecam_variant``. ``channels_last`` runs the masked batches and the model's
    weights (converted in place) in channels_last memory format, on any device (same values);
    ``cuda_autocast`` runs the forwards under autocast on CUDA (no effect on CPU).
    """

    name = "scorecam"
    #: haofanwang/Score-CAM cam/scorecam.py:84-90: ReLU, then (M - min) / (max - min).
    reference_norm = "minmax"

    def __init__(self, model: nn.Module, params: Params | None = None, *,
                 chunk: int | None = None, baseline: bool | None = None, score: str | None = None,
                 weights: str | None = None, variant: str | None = None, channels_last: bool = True, cuda_autocast: bool | None = None,
                 target_layer: str | nn.Module | None = None, device: torch.device | str | None = None):
        super().__init__(model, params, target_layer=target_layer, device=device)
        score = score if score is not None else self.params.scorecam_score
        weights = weights if weights is not None else self.params.scorecam_weights
        _check_score(score, weights)
        self.weights = weights
        self.chunk = int(chunk if chunk is not None else self.params.scorecam_chunk)
        self.baseline = bool(self.params.scorecam_baseline if baseline is None else baseline)
        self.score = score
        self.variant = variant if variant is not None else self.params.scorecam_variant
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)} (got {self.variant!r})")
        self.channels_last = channels_last
        self.cuda_autocast = self.params.cuda_amp if cuda_autocast is None else cuda_autocast
        if channels_last:  # the masked batches are channels_last; convert the weights once to match
            self.model.to(memory_format=torch.channels_last)

    def _baseline_scores(self, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor | None:
        if not self.baseline:
            return None
        with _autocast(x.device, self.cuda_autocast):
            logits = self.model(_layout(torch.zeros_like(x[:1]), self.channels_last))
        return _score(logits[0, classes], self.score)

    @torch.inference_mode()
    def maps(self, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        return self.maps_batch(x, [classes])[0]

    @torch.inference_mode()
    def maps_batch(self, x: torch.Tensor, classes: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        A = self.activations(x)
        if self.variant == "study":
            cams = _study_maps(self.model, x, A, self.chunk, self.channels_last, self.cuda_autocast)
            return [cams[b, c] for b, c in enumerate(classes)]
        out = []
        for b, c in enumerate(classes):
            if c.numel() == 0:
                out.append(A.new_zeros((0, *A.shape[2:]), dtype=torch.float32))
                continue
            xb = x[b:b + 1]
            S = scorecam_scores(self.model, xb, A[b:b + 1], c, self.chunk,
                                self._baseline_scores(xb, c), self.score, self.channels_last,
                                self.cuda_autocast)
            out.append(_combine(A[b], S, self.weights))
        return out


class ScoreCAMReference(ScoreCAM):
    """Score-CAM, reference loop: for every class, for every channel, one forward of one
    masked image (float32, no chunking, no autocast). Same math as :class:`ScoreCAM`
    (Wang et al., CVPRW 2020); used to test the fast path. Correct variant only."""

    name = "scorecam-reference"

    @torch.inference_mode()
    def maps(self, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        A = self.activations(x)[0].float()  # (C, h, w)
        H, W = x.shape[-2:]
        C = A.shape[0]
        maps = []
        for c in classes.tolist():
            base = torch.sigmoid(self.model(torch.zeros_like(x))[0, c]) if self.score == "sigmoid" \
                else self.model(torch.zeros_like(x))[0, c]
            s = []
            for k in range(C):
                if A[k].max() == A[k].min():
                    s.append(torch.tensor(float("-inf"), device=x.device))
                    continue
                up = F.interpolate(A[k][None, None], size=(H, W), mode="bilinear", align_corners=False)[0, 0]
                mask = (up - up.min()) / (up.max() - up.min()) if up.max() > up.min() else torch.zeros_like(up)
                y = self.model(x * mask)[0, c]
                f = torch.sigmoid(y) if self.score == "sigmoid" else y
                s.append(f - base if self.baseline else f)
            s = torch.stack(s)
            if torch.isinf(s).all():
                maps.append(torch.zeros_like(A[0]))
                continue
            a = torch.softmax(s, dim=0) if self.weights == "softmax" else torch.where(torch.isinf(s), 0.0, s)
            maps.append(torch.relu((a[:, None, None] * A).sum(0)))
        return torch.stack(maps) if maps else A.new_zeros((0, *A.shape[1:]))

    def maps_batch(self, x: torch.Tensor, classes: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [self.maps(x[b:b + 1], c) for b, c in enumerate(classes)]


# ---------------------------------------------------------------------- batch APIs
@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Eval mode for the block (BatchNorm uses, and does not update, running stats)."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def scorecam_batch(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, chunk: int = 64,
                   baseline: bool = True, score: str = "sigmoid", channels_last: bool = True,
                   cuda_autocast: bool = True, weights: str = "softmax") -> torch.Tensor:
    """Correct Score-CAMs (B, K, h, w) of a batch, per image, for its present classes.

    ``x`` (B,3,H,W) normalised (any B, any crop size); ``labels`` (B,K) multi-hot. For each
    image one chunked pass over the channels of ``model.features`` scores all its present
    classes at once; absent classes are zero. Maps are raw (not normalised), at feature
    resolution, float32, computed without grad (a plain tensor, usable as a mask in a
    training step). The model is run in eval mode and its mode restored afterwards.
    """
    _check_score(score, weights)
    with torch.no_grad(), _eval_mode(model):
        A = model.features(x)
        B, C, h, w = A.shape
        out = A.new_zeros((B, labels.shape[1], h, w), dtype=torch.float32)
        base_logits = None
        if baseline:
            with _autocast(x.device, cuda_autocast):
                base_logits = model(_layout(torch.zeros_like(x[:1]), channels_last))[0]
        for b in range(B):
            cls = labels[b].nonzero().flatten()
            if cls.numel() == 0:
                continue
            base = _score(base_logits[cls], score) if base_logits is not None else None
            S = scorecam_scores(model, x[b:b + 1], A[b:b + 1], cls, chunk, base, score, channels_last, cuda_autocast)
            out[b, cls] = _combine(A[b], S, weights)
    return out


def _study_maps(model: nn.Module, x: torch.Tensor, A: torch.Tensor, chunk: int, channels_last: bool,
                cuda_autocast: bool) -> torch.Tensor:
    """The study's batch Score-CAM (B, K, h, w) for all K classes; see the module docstring."""
    B, C = A.shape[:2]
    H, W = x.shape[-2:]
    valid = _non_constant(A[0])  # skipping is decided on item 0, like the scores
    per = max(1, int(chunk) // B)  # channels per forward: about `chunk` images per forward
    S = None
    with _autocast(x.device, cuda_autocast):
        for i in range(0, valid.numel(), per):
            idx = valid[i:i + per]
            m = idx.numel()
            up = F.interpolate(A[:, idx].float(), size=(H, W), mode="bilinear", align_corners=False)
            masked = (x[:, None] * _min_max(up)[:, :, None]).reshape(B * m, 3, H, W)
            logits = model(_layout(masked, channels_last)).float().view(B, m, -1)
            if S is None:
                S = torch.full((C, logits.shape[-1]), float("-inf"), device=x.device)
            S[idx] = logits[0]  # the bug: item 0's scores for the whole batch
    if S is None:  # no usable channel in item 0
        K = model(x[:1]).shape[1]
        return A.new_zeros((B, K, *A.shape[2:]), dtype=torch.float32)
    w = torch.softmax(S, dim=0)  # softmax over channels of raw logits
    return F.relu(torch.einsum("kc,bkhw->bchw", w, A.float()))


def study_scorecam_batch(model: nn.Module, x_batch: torch.Tensor, labels_batch: torch.Tensor,
                         chunk: int = 64, channels_last: bool = True, cuda_autocast: bool = True) -> torch.Tensor:
    """The student project's Score-CAM for a batch (B, K, h, w), for replaying its numbers.

    One forward per channel over the whole batch, scores (raw logits, no baseline) read
    from item 0 and applied to every image; absent classes (``labels_batch`` (B,K)
    multi-hot) are zeroed. Raw maps at feature resolution, no grad, eval mode. See the
    module docstring for how this differs from :func:`scorecam_batch`.
    """
    with torch.no_grad(), _eval_mode(model):
        A = model.features(x_batch)
        cams = _study_maps(model, x_batch, A, chunk, channels_last, cuda_autocast)
        return cams * (labels_batch[:, :, None, None] > 0)
