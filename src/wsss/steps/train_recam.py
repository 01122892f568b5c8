"""Steps ``train-recam`` and ``train-recam-scorecam``: ReCAM fine-tuning of the classifier.

Chen, Wang, Wu, Hua, Zhang and Sun, "Class Re-Activation Maps for Weakly-Supervised Semantic
Segmentation", CVPR 2022.

Starting from ``outputs/checkpoints/cls.pt``, a second bias-free 1x1 classifier W'
(``recam_predictor``, K = 20 outputs) is added and the model trained with

    L = L_soft-margin(z, y) + recam_lambda * L_sce,

    L_sce = 1/B sum_b [ 1/|P_b| sum_{c in P_b} CE( W' f_bc, c ) ],   f_bc = GAP(A_b * M_bc),

where P_b are the classes present in image b (images without one add 0 and still count in
B), A_b the last feature map of image b and M_bc the class-c mask normalised by its maximum,
M_bc = m_bc / (max m_bc + 1e-5). At inference (``wsss.cams.cam.ReCAM``) the CAM uses the
weights W * W'.

The recipe of the official code (zhaozhengChen/ReCAM, docs/methods.md "ReCAM" cites the
lines): the trunk and W at 0.1 ``recam_lr``, W' at ``recam_lr`` (step/train_recam.py:71-75),
poly decay 0.9 over ``recam_epochs`` epochs of ``recipe_list_size`` images (4 x 661 = 2,644
steps), SGD with ``recam_momentum`` (1e-4, the official PolyOptimizer's quirk), conv1/bn1 and
the BatchNorm statistics frozen (``freeze_stem_bn``), trained on ``recam_split`` (train_aug),
L_sce averaged per image then over the batch (net/resnet50_cam.py:147-173) with a gradient
through the CAM mask (``recam_detach_mask``, net/resnet50_cam.py:93-98). W's accuracy on the
present pairs (argmax of W' f_bc = c) is logged as the official code logs it
(``predictor_acc``); a W' at chance re-weights W with noise, and :func:`predictor_warning`
says so in the summary line and in the report.

Masks m_bc:

* variant ``cam`` (``recam.pt``): the CAM of the current features, ReLU(w_c^T A_b).
* variant ``scorecam`` (``recam-scorecam.pt``): a Score-CAM (Wang et al., CVPRW 2020), from
  the source named by ``recam_scorecam_mask``:

  - ``seeds`` (default): the Score-CAMs of ``cls.pt`` for each training image, the maps
    ``python cli.py seeds --method scorecam`` writes, made by this stage into a temporary
    folder (:func:`scorecam_masks`) so that it reads no other method's outputs, cropped/flipped/rescaled together with the image and average-pooled to the
    feature size. ReCAM trains at a small learning rate for few epochs, so the classifier
    barely moves from ``cls.pt`` and the Score-CAM of the start checkpoint is a close
    stand-in for a per-step Score-CAM, at no extra cost per step (a per-step Score-CAM is
    one forward per channel per image: 512 x 16 forwards per step with ResNet-18, about a
    minute per step on 2 CPU cores).
  - ``online``: at every step the correct Score-CAM of the current model on the current
    crops (:func:`wsss.cams.scorecam.scorecam_batch`, ``scorecam_chunk``,
    ``scorecam_baseline``, ``scorecam_score``, ``scorecam_weights``), or the student project's variant
    (:func:`wsss.cams.scorecam.study_scorecam_batch`) when ``scorecam_variant: study``.

Writes ``outputs/checkpoints/<name>.pt`` and ``outputs/metrics/train_<name>.json``.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import Params, resolve_device, seed_everything
from ..datasets import ClassificationData, random_scale_flip_crop, to_tensor
from ..errors import UserError
from ..distributed import is_main
from ..io import write_json
from ..metrics import predictor_warning
from ..models.classifier import load_classifier
from ..tracking import step_run
from ..trainer import LoopSpec, classification_scores, frozen, train_loop
from .common import checkpoint_path, open_split, out_dir, read_seed, summary

VARIANTS = ("cam", "scorecam")
TRAINING_KEYS = ("seed", "dataset", "data_dir", "recam_split", "subset", "recam_epochs", "recam_lr",
                 "recam_lambda", "recam_momentum", "recam_detach_mask", "cls_batch_size", "cls_weight_decay",
                 "cls_crop", "max_steps", "recipe_list_size", "freeze_stem_bn")
SCORECAM_KEYS = ("scorecam_chunk", "scorecam_variant", "scorecam_baseline", "scorecam_score",
                 "scorecam_weights")
#: what shapes the Score-CAM masks of recam_scorecam_mask: seeds (see :func:`scorecam_masks`)
SEED_MASK_KEYS = ("scorecam_chunk", "scorecam_variant", "scorecam_baseline", "scorecam_score", "scorecam_weights",
                  "scorecam_scales",
                  "scorecam_flip", "cam_batch_size")
EPS = 1e-5
def stage_name(variant: str) -> str:
    """Checkpoint stem and method name: ``recam`` or ``recam-scorecam``."""
    return "recam" if variant == "cam" else "recam-scorecam"


# ---------------------------------------------------------------------------- the math
def normalise_max(maps: torch.Tensor) -> torch.Tensor:
    """(B, K, h, w) non-negative maps divided by their per-map max (+1e-5)."""
    return maps / (maps.flatten(2).amax(-1)[:, :, None, None] + EPS)


def cam_masks(model: nn.Module, feats: torch.Tensor, detach: bool = False) -> torch.Tensor:
    """M = CAM / max CAM (B, K, h, w) of the current features (ReLU, then the max over h, w).

    ``detach`` False is the official code (net/resnet50_cam.py:93-98): L_sce's gradient also
    flows through the mask, its max normalisation included, into W and the trunk. True keeps
    the mask out of the graph (the pre-issue-13 default here): the mask then only chooses
    *where* features are pooled, as a Score-CAM mask (no gradient at all) does."""
    if detach:
        return normalise_max(model.raw_cams(feats.detach()).detach())
    return normalise_max(model.raw_cams(feats))


def recam_loss(model: nn.Module, feats: torch.Tensor, labels: torch.Tensor,
               masks: torch.Tensor | None = None, with_acc: bool = False):
    """ReCAM's softmax cross-entropy L_sce (Chen et al., CVPR 2022) for a batch.

    ``feats`` A (B, C, h, w); ``labels`` (B, K) multi-hot; ``masks`` (B, K, h, w) in [0, 1]
    at feature size (None: :func:`cam_masks`). For every present pair (b, c):
    f_bc = mean_{hw}(A_b * M_bc) (C,), p_bc = W' f_bc (K,), and, averaged as the official
    ``Class_Predictor`` does (net/resnet50_cam.py:165-173): the mean CE over the classes of
    each image, summed over images, divided by the batch size B (images without a class count
    in B). Vectorised over all pairs; 0 (with a graph) when no class is present.

    ``with_acc``: also return the accuracy of W' (argmax p_bc = c) over all present pairs of
    the batch, as the official code logs it (a float; nan without pairs).
    """
    if model.recam_predictor is None:
        raise ValueError("model has no recam_predictor; call add_recam_predictor() first")
    if masks is None:
        masks = cam_masks(model, feats)
    if masks.shape[-2:] != feats.shape[-2:]:
        raise ValueError(f"masks {tuple(masks.shape[-2:])} and features {tuple(feats.shape[-2:])} differ in size")
    b, c = (labels > 0).nonzero(as_tuple=True)
    if b.numel() == 0:
        loss = feats.sum() * 0.0
        return (loss, float("nan")) if with_acc else loss
    f = torch.einsum("pchw,phw->pc", feats[b], masks[b, c].to(feats.dtype)) / (feats.shape[-2] * feats.shape[-1])
    p = model.recam_predictor(f[:, :, None, None]).flatten(1)
    ce = F.cross_entropy(p, c, reduction="none")
    per_image = (labels > 0).sum(1).to(ce.dtype)  # |P_b|
    loss = (ce / per_image[b]).sum() / labels.shape[0]
    if not with_acc:
        return loss
    return loss, float((p.argmax(1) == c).float().mean())


def pool_masks(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Image-size maps (B, K, H, W) -> feature size by adaptive average pooling, renormalised."""
    maps = maps.float()
    if tuple(maps.shape[-2:]) != tuple(size):
        if maps.shape[-2] >= size[0] and maps.shape[-1] >= size[1]:
            maps = F.adaptive_avg_pool2d(maps, size)
        else:
            maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    return normalise_max(maps.clamp_min(0))


# ---------------------------------------------------------------------------- data
def joint_scale_flip_crop(rng: np.random.Generator, image: np.ndarray, maps: np.ndarray, crop: int):
    """:func:`wsss.datasets.random_scale_flip_crop` applied to an image and to maps at once.

    ``maps`` (n, H, W) uint8. They go through the same function as extra image channels,
    three at a time (bilinear rescale, zero padding: "no object" outside the image), each
    call with a copy of the same generator, so they receive exactly the draws (scale, flip,
    crop offset) of the image. Returns the image crop and (n, crop, crop) uint8 maps; the
    image crop equals what :class:`~wsss.datasets.ClassificationData` makes for this rng.
    """
    state = copy.deepcopy(rng)
    out_image, _ = random_scale_flip_crop(rng, image, None, crop)
    out = np.zeros((len(maps), crop, crop), np.uint8)
    for i in range(0, len(maps), 3):
        group = maps[i:i + 3]
        rgb = np.zeros((*group.shape[1:], 3), np.uint8)
        rgb[..., :len(group)] = np.moveaxis(group, 0, -1)
        moved, _ = random_scale_flip_crop(copy.deepcopy(state), rgb, None, crop)
        out[i:i + len(group)] = np.moveaxis(moved[..., :len(group)], -1, 0)
    return out_image, out


def seeds_folder():
    return out_dir("seeds", "scorecam")


def scorecam_masks(params: Params, voc, device) -> tuple[tempfile.TemporaryDirectory | None, Path]:
    """The Score-CAMs of ``cls.pt`` for every image of ``voc`` (the ``recam_split``), written as
    seed files into a temporary folder (removed by the caller): the same maps as ``seeds
    --method scorecam`` (same method, params and checkpoint), made here so that this stage
    reads no other method's outputs and runs whether or not ``scorecam`` is listed. Under
    torchrun rank 0 owns the folder (returned as the TemporaryDirectory; None elsewhere) and
    every rank writes its shard of the images into it."""
    from .. import distributed
    from ..cams.registry import get_method
    from ..models.classifier import load_classifier
    from .seeds import method_params, write_seeds

    model, _ = load_classifier(checkpoint_path("cls"), device)
    cam = get_method("scorecam", model, method_params(params, "scorecam"))
    tmp = tempfile.TemporaryDirectory(prefix="recam-scorecam-masks-") if distributed.is_main() else None
    folder = Path(distributed.broadcast(tmp.name if tmp is not None else None))
    try:
        write_seeds(cam, voc, folder, "Score-CAM masks")
        distributed.barrier()
    except BaseException:
        if tmp is not None:
            tmp.cleanup()
        raise
    return tmp, folder


class SeedMaskData(ClassificationData):
    """:class:`~wsss.datasets.ClassificationData` plus per-image Score-CAM masks from the seeds
    stage: yields (image, label, idx, maps (K, crop, crop) float32 in [0, 1])."""

    def __init__(self, voc, crop: int, rng_seed: int = 0, folder=None):
        self.folder = folder if folder is not None else seeds_folder()
        missing = [i for i in voc.ids if not (self.folder / f"{i}.npz").is_file()]
        if missing:
            raise UserError(f"{self.folder / (missing[0] + '.npz')}: Score-CAM seeds missing ({len(missing)} of "
                            f"{len(voc.ids)} training images); run `python cli.py seeds --method scorecam` first "
                            f"(with seed_split covering recam_split '{voc.split}'), or set "
                            f"recam_scorecam_mask: online")
        super().__init__(voc, crop, rng_seed)
        self.num_classes = len(self.labels[0]) if self.labels else 20

    def _maps(self, idx: int) -> tuple[np.ndarray, np.ndarray]:
        """(keys, maps quantised to uint8) of one image, read and checked by the one seed reader."""
        keys, cams = read_seed(self.folder / f"{self.voc.ids[idx]}.npz", "scorecam", self.images[idx].shape[:2])
        return keys, np.round(cams * 255.0).astype(np.uint8)

    def __getitem__(self, idx: int):
        rng = np.random.default_rng((self.rng_seed, self.epoch, idx))
        keys, q = self._maps(idx)
        image, crops = joint_scale_flip_crop(rng, self.images[idx], q, self.crop)
        maps = np.zeros((self.num_classes, self.crop, self.crop), np.float32)
        maps[keys] = crops.astype(np.float32) / 255.0
        return to_tensor(image), torch.from_numpy(self.labels[idx]), idx, torch.from_numpy(maps)


# ---------------------------------------------------------------------------- the step
def make_step_fn(params: Params, variant: str, source: str):
    """``step_fn(model, batch, step) -> (loss, logs)`` for :func:`wsss.trainer.train_loop`."""
    lam = params.recam_lambda

    def masks_for(m, x, y, feats, batch):
        if variant == "cam":
            return cam_masks(m, feats, detach=params.recam_detach_mask)
        if source == "seeds":
            return pool_masks(batch[3], feats.shape[-2:])
        from ..cams.scorecam import scorecam_batch, study_scorecam_batch

        if params.scorecam_variant == "study":
            raw = study_scorecam_batch(m, x, y, chunk=params.scorecam_chunk)
        else:
            raw = scorecam_batch(m, x, y, chunk=params.scorecam_chunk, baseline=params.scorecam_baseline,
                                 score=params.scorecam_score, weights=params.scorecam_weights)
        return pool_masks(raw.detach(), feats.shape[-2:])

    def step_fn(m, batch, step):
        x, y = batch[0], batch[1]
        feats = m.features(x)
        logits = m.head(feats)
        masks = masks_for(m, x, y, feats, batch)
        l_cls = F.multilabel_soft_margin_loss(logits, y)
        l_sce, acc = recam_loss(m, feats, y, masks, with_acc=True)
        loss = l_cls + lam * l_sce
        return loss, {"loss": loss.item(), "loss_cls": l_cls.item(), "loss_sce": l_sce.item(),
                      "predictor_acc": acc}

    return step_fn


def run(params: Params, variant: str = "cam") -> dict:
    if variant not in VARIANTS:
        raise UserError(f"train-recam: variant must be one of {', '.join(VARIANTS)} (got {variant!r})")
    source = params.recam_scorecam_mask  # seeds | online (checked by Params)
    name = stage_name(variant)
    stage = f"train-{name}"
    seed_everything(params.seed, params.threads)
    device = resolve_device(params.device, params.cuda_amp)
    model, cls_ckpt = load_classifier(checkpoint_path("cls"), device)
    if model.recam_predictor is None:
        model.add_recam_predictor()
    if frozen(params, trained_start=True):  # ReCAM always starts from the trained cls.pt
        model.freeze_stem_bn()
    train = open_split(params, params.recam_split)
    val = open_split(params, params.val_split)
    masks_dir = None
    if variant == "scorecam" and source == "seeds":
        masks_dir, folder = scorecam_masks(params, train, device)
        data = SeedMaskData(train, params.cls_crop, params.seed, folder=folder)
    else:
        data = ClassificationData(train, params.cls_crop, params.seed)
    keys = {k: getattr(params, k) for k in TRAINING_KEYS}
    if variant == "scorecam":
        keys["recam_scorecam_mask"] = source
        keys.update({k: getattr(params, k) for k in (SCORECAM_KEYS if source == "online" else SEED_MASK_KEYS)})
    keys["variant"] = variant
    keys["init"] = cls_ckpt.get("fingerprint")  # a retrained cls.pt invalidates a resume file

    try:
        return _train(params, variant, source, model, data, val, keys, device, name, stage, train)
    finally:
        if masks_dir is not None:
            masks_dir.cleanup()


def loop_spec(params: Params, name: str = "recam", keys: dict | None = None) -> LoopSpec:
    """The optimiser and schedule of train-recam (docs/methods.md, "ReCAM"): the trunk and W at
    0.1 ``recam_lr``, W' (new prefix ``recam_predictor``) at ``recam_lr``."""
    return LoopSpec(name, params.recam_epochs, params.recam_lr, params.cls_batch_size,
                    params.cls_weight_decay, params.max_steps, keys or {}, lr_mults=(0.1, 1.0),
                    momentum=params.recam_momentum, ref_items=params.recipe_list_size,
                    batch_key="cls_batch_size", sync_bn=params.sync_bn, cuda_amp=params.cuda_amp)


def _train(params, variant, source, model, data, val, keys, device, name, stage, train) -> dict:
    spec = loop_spec(params, name, keys)
    step_fn = make_step_fn(params, variant, source)
    with step_run("train", params, method=name) as tracker:
        logs = train_loop(spec, model, data, step_fn, out_dir("checkpoints"), device, tracker, params.seed,
                          new_prefixes=("recam_predictor",),
                          epoch_end=lambda m, e: classification_scores(m, val, device))
        nan = float("nan")
        metrics = {k: logs.get(k, nan) for k in ("loss", "loss_cls", "loss_sce", "predictor_acc", "val_map",
                                                 "val_f1")}
        metrics.update({"steps": int(logs["steps"]), "n_train": len(train)})
        tracker.log_metrics({f"final_{k}": v for k, v in metrics.items()})
        tracker.set_tags({"wsss.recam_mask": "cam" if variant == "cam" else f"scorecam-{source}"})
        if is_main():
            write_json(out_dir("metrics", f"train_{name}.json"), metrics)
    summary(stage, f"{metrics['steps']} steps, loss {metrics['loss']:.4f} (sce {metrics['loss_sce']:.4f}, "
                   f"W' accuracy {metrics['predictor_acc']:.3f}), "
                   f"val mAP {metrics['val_map']:.3f}, val F1 {metrics['val_f1']:.3f}")
    warning = predictor_warning(metrics["predictor_acc"], model.num_classes)
    if warning and is_main():
        print(f"[{stage}] {warning}")
    return metrics
