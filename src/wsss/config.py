"""A flat, typed configuration read from ``params.yaml`` and validated on load.

Every pipeline step receives one :class:`Params`. Keys are flat (``cls_lr``, not
``cls: {lr:}``) so that ``dvc exp run -S key=value`` and ``dvc.yaml`` ``params:`` lists
stay one word each. Unknown keys, wrong types and out-of-range values raise
:class:`~wsss.errors.UserError` naming the key and the fix.

One set of defaults: the field defaults below equal ``params.yaml`` (a test compares them key
by key), so ``Params()`` is the configuration the pipeline runs. ``Params`` is frozen and
checked on construction, so an object that exists is valid: change a value with
``dataclasses.replace(p, key=value)``, which checks again.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml

from .errors import UserError

#: method -> checkpoint its seeds read, from the one declaration of the methods (wsss.methods).
from .methods import METHOD_CHECKPOINTS  # noqa: E402
from .methods import validate as _validate_methods  # noqa: E402


@dataclass(frozen=True)
class Params:
    # reproducibility and hardware
    seed: int = 0
    device: str = "cpu"  # cpu | cuda | auto
    num_workers: int = 0  # CRF process pool size; 0 = all cores
    # torch CPU threads of every step. Float reductions split by thread count, so the same
    # params give the same bits only with the same value; 0 = torch's default (all cores)
    threads: int = 2
    # processes per machine for the distributed steps (training, seeds, eval-seg): above 1,
    # `python cli.py <step>` starts itself under torchrun (wsss.distributed); threads is per process
    nproc: int = 1
    sync_bn: bool = True  # distributed training: BatchNorm statistics over the global batch
    cuda_amp: bool = True  # on CUDA: autocast (bf16, else fp16 + GradScaler), channels_last, cudnn.benchmark

    # data
    dataset: str = "synth"  # synth | voc
    data_dir: str = "data/VOC2012"
    train_split: str = "train_aug"  # classifier training list (VOC: train_aug = train + SBD)
    seed_split: str = "train"  # list on which seeds and pseudo-masks are made and scored
    val_split: str = "val"  # list on which the segmentation network is scored
    subset: int = 0  # keep only the first N ids of every list (0 = all); the study used 30

    # synthetic world
    synth_seed: int = 0
    synth_n_train: int = 160
    synth_n_val: int = 60
    synth_n_extra: int = 480  # extra images listed only in train_aug (like SBD)
    synth_size: int = 96
    synth_max_objects: int = 3
    synth_extent: list[float] = field(default_factory=lambda: [0.3, 0.75])  # body's longer side / image side
    synth_body_tint: float = 0.5  # how far each body's colour leans to its class's own hue (0 = group colour)
    synth_part_size: float = 0.55  # part disc diameter / body's shorter side (at least 10 px across)
    synth_cooccur: float = 0.5
    synth_context: float = 0.7
    synth_occlusion: float = 0.3
    synth_void_width: int = 2

    # classifier
    backbone: str = "resnet18"
    output_stride: int = 16
    pretrained: str = "none"  # none | imagenet | path to a torchvision state dict
    # IRN/ReCAM recipe (run_sample.py): 5 epochs of VOC train_aug at batch 16 (3,305 steps), lr 0.1
    cls_epochs: int = 5
    cls_batch_size: int = 16
    cls_lr: float = 0.1
    cls_weight_decay: float = 1e-4
    # SGD momentum of train-cls. IRN/ReCAM's PolyOptimizer hands its weight decay to SGD's
    # momentum slot (misc/torchutils.py:11-12), so their classifier trains with momentum 1e-4,
    # i.e. plain SGD; 0.9 is what the code's argument names meant (the pre-issue-13 default)
    cls_momentum: float = 1e-4
    cls_crop: int = 96
    max_steps: int = 0  # optimiser step budget per training stage (0 = no cap)
    # Recipes in optimiser steps: each stage's *_epochs count passes over a list of this many
    # images (VOC 2012 train_aug, the list of every reference recipe), so a recipe reaches the
    # reference's number of optimiser steps on any list; 0 = epochs over the list trained on
    recipe_list_size: int = 10582
    # conv1/bn1 without gradient and every BatchNorm on its running statistics (IRN/ReCAM's
    # FixedBatchNorm): trained = whenever the trunk starts from trained weights (the reference
    # always does: ImageNet; here cls.pt for ReCAM, `pretrained` for train-cls) | always | never
    freeze_stem_bn: str = "trained"

    # seeds
    # method -> checkpoint its seeds are read from (outputs/checkpoints/<name>.pt); the value
    # is fixed per method (wsss.methods) and is spelled out only so dvc.yaml can use it.
    methods: dict[str, str] = field(default_factory=lambda: dict(METHOD_CHECKPOINTS))
    cam_scales: list[float] = field(default_factory=lambda: [2.0, 2.5, 3.0])  # x the image side
    cam_flip: bool = True
    # test-time image resize: bicubic on the uint8 image (PIL, as IRN/ReCAM/Puzzle-CAM/SIPE) | bilinear
    # (torch, on the normalised tensor: this harness before issue 13)
    cam_resize: str = "bicubic"
    # final map normalisation: reference (each method's own code: Score-CAM min-max, the others
    # divide by the max) | max | minmax (see wsss.cams.base)
    cam_norm: str = "reference"
    cam_batch_size: int = 8
    # Grad-CAM++: divide each channel's alphas by their spatial sum, as the author's code does
    # (the paper's Eq. 19 does not; see wsss.cams.gradcampp)
    gradcampp_alpha_norm: bool = True
    scorecam_chunk: int = 64
    scorecam_variant: str = "correct"  # correct | study
    scorecam_baseline: bool = True
    scorecam_score: str = "sigmoid"  # sigmoid | logit: f_c in Score-CAM's channel scores
    scorecam_weights: str = "softmax"  # softmax (the paper) | linear (the authors' code): channel weights
    scorecam_scales: list[float] = field(default_factory=lambda: [1.0])  # one forward per channel per pass
    scorecam_flip: bool = False
    threshold: float = 0.21
    threshold_sweep: list[float] = field(
        default_factory=lambda: [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    )

    # ReCAM (Chen et al. 2022)
    recam_epochs: int = 4  # epochs of recipe_list_size images: 4 x 661 = 2,644 steps
    recam_lr: float = 5e-4  # W' at recam_lr, trunk and W at 0.1 recam_lr (train_recam.py:71-75)
    recam_lambda: float = 1.0
    recam_momentum: float = 1e-4  # SGD momentum of train-recam (see cls_momentum)
    recam_detach_mask: bool = False  # True: no gradient through the CAM mask of L_sce (the official code has one)
    recam_split: str = "train_aug"  # ReCAM fine-tuning list (both variants), as run_sample.py:28
    recam_scorecam_mask: str = "seeds"  # seeds | online (see docs/methods.md)
    # Puzzle-CAM (Jo & Yu 2021)
    puzzle_epochs: int = 10
    puzzle_lr: float = 0.1  # official --lr 0.1; with momentum 1e-4 (below) the step of the old 0.01 + momentum 0.9
    puzzle_alpha: float = 4.0
    puzzle_init: str = "cls"  # cls: continue from outputs/checkpoints/cls.pt | pretrained
    # SGD of the official PolyOptimizer: weight decay lands in SGD's momentum slot (effective
    # momentum 1e-4), nesterov on; biases at 2x lr without weight decay (see train_puzzle.py)
    puzzle_momentum: float = 0.0001
    puzzle_nesterov: bool = True
    puzzle_bias_groups: bool = True
    # SIPE (Chen et al. 2022)
    sipe_epochs: int = 5  # epochs of VOC train_aug (10,582 images): 5 x 661 = 3,305 steps at batch 16
    sipe_lr: float = 0.01
    sipe_lambda: float = 1.0
    sipe_init: str = "cls"  # cls: continue from outputs/checkpoints/cls.pt | pretrained
    # the official PolyOptimizerSGD passes the weight decay (1e-4) into SGD's momentum slot
    # (tool/torchutils.py:13-14), so SIPE's reference trains with momentum 1e-4, not 0.9
    sipe_momentum: float = 1e-4
    sipe_grad_clip: float = 1.0  # gradient-norm clip of all parameters (0 = off), as the official code

    # dense CRF pseudo-masks
    conf_fg: float = 0.35
    conf_bg: float = 0.10
    crf_iters: int = 10
    crf_gauss_sxy: float = 3.0
    crf_gauss_compat: float = 3.0
    crf_bilateral_sxy: float = 10.0
    crf_bilateral_srgb: float = 13.0
    crf_bilateral_compat: float = 10.0

    # IRN (Ahn et al. 2019): boundary network and random walk (train-irn, make-sem-seg)
    irn_epochs: int = 3  # epochs of recipe_list_size images at irn_batch_size: 3 x 330 = 990 steps
    irn_lr: float = 0.1
    irn_batch_size: int = 32
    irn_crop: int = 96  # VOC 512; a 24x24 stride-4 map here, 128x128 there
    # pair radius at stride 4 of the affinity labels (official 10 at crop 512) and of the walk
    # (official 5): scaled by the stride-4 map side (24 here vs 128 / about 110 on VOC), floored
    # at 2, the smallest radius with pairs (see docs/methods.md, "IRN")
    irn_radius: int = 2
    irn_walk_radius: int = 2
    irn_beta: float = 10.0
    irn_exp_times: int = 8  # the walk runs 2^irn_exp_times steps
    sem_seg_bg_thres: float = 0.25  # background score of the walked maps (IRN 0.25, ReCAM 0.28)
    pseudo_masks: str = "crf"  # crf | irn: the pseudo-masks train-seg trains on

    # segmentation network
    seg_backbone: str = "resnet18"
    seg_epochs: int = 50
    seg_batch_size: int = 16
    seg_lr: float = 0.01
    seg_weight_decay: float = 1e-4
    seg_crop: int = 96
    seg_decoder: str = "v3plus"  # none | v3plus (DeepLab-v3+ decoder on the stride-4 features)
    seg_crf: bool = False  # dense CRF post-processing in eval-seg
    # backbone start: "pretrained" (above) or "cls": the trunk of outputs/checkpoints/cls.pt,
    # trained on image labels only (the offline stand-in for ImageNet initialisation)
    seg_init: str = "cls"
    seg_val_every: int = 0  # quick val mIoU every N epochs during train-seg (0 = only after the last)

    # DSRG (Huang et al. 2018): train-dsrg (same network and schedule as train-seg) and eval-dsrg
    dsrg_fg_thres: float = 0.35  # seed: argmax class of the present CAMs where its CAM > this
    dsrg_bg_thres: float = 0.10  # seed: background where every present CAM (or the saliency) < this
    dsrg_saliency_dir: str = ""  # folder of <id>.png saliency maps for the background seeds; "" = none
    dsrg_grow_fg: float = 0.85  # growing threshold of a class (official th2)
    dsrg_grow_bg: float = 0.99  # growing threshold of background (official th1)
    dsrg_grow_on: str = "crf"  # crf (official UpdateSeedLayer3) | softmax (the paper's H)
    dsrg_rounds: int = 2  # 1: DSRG training; each further round retrains on the previous one's predictions

    # ------------------------------------------------------------------ validation
    def __post_init__(self) -> None:
        """Check every value on construction (``Params(...)``, ``dataclasses.replace``): types
        first (ints are accepted where floats are and stored as floats; lists and mappings are
        copied, so the object shares no mutable value with its caller), then ranges."""
        source = _SOURCE.get()
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _coerce(f.name, getattr(self, f.name), source))
        self._check_ranges(source)

    def _check_ranges(self, source: str) -> None:
        def bad(key: str, why: str) -> UserError:
            return UserError(f"{source}: key '{key}' {why}")

        def positive(*keys: str) -> None:
            for k in keys:
                if getattr(self, k) <= 0:
                    raise bad(k, f"must be > 0 (got {getattr(self, k)!r})")

        def unit(*keys: str) -> None:
            for k in keys:
                v = getattr(self, k)
                if not 0.0 <= v <= 1.0:
                    raise bad(k, f"must be in [0, 1] (got {v!r})")

        def choice(key: str, options: list[str]) -> None:
            if getattr(self, key) not in options:
                raise bad(key, f"must be one of {', '.join(options)} (got {getattr(self, key)!r})")

        choice("device", ["cpu", "cuda", "auto"])
        choice("dataset", ["synth", "voc"])
        choice("backbone", ["resnet18", "resnet34", "resnet50"])
        choice("seg_backbone", ["resnet18", "resnet34", "resnet50"])
        choice("seg_decoder", ["none", "v3plus"])
        choice("scorecam_variant", ["correct", "study"])
        choice("scorecam_score", ["sigmoid", "logit"])
        choice("scorecam_weights", ["softmax", "linear"])
        choice("recam_scorecam_mask", ["seeds", "online"])
        choice("freeze_stem_bn", ["trained", "always", "never"])
        choice("cam_resize", ["bicubic", "bilinear"])
        choice("cam_norm", ["reference", "max", "minmax"])
        choice("pseudo_masks", ["crf", "irn"])
        choice("dsrg_grow_on", ["crf", "softmax"])
        for key in ("seg_init", "puzzle_init", "sipe_init"):
            choice(key, ["pretrained", "cls"])
        if self.output_stride not in (8, 16, 32):
            raise bad("output_stride", f"must be 8, 16 or 32 (got {self.output_stride})")
        positive("nproc", "synth_n_train", "synth_n_val", "synth_max_objects", "cls_epochs",
                 "cls_batch_size", "cls_lr", "cls_crop", "cam_batch_size", "scorecam_chunk",
                 "recam_epochs", "recam_lr", "puzzle_epochs", "puzzle_lr", "sipe_epochs",
                 "sipe_lr", "seg_epochs", "seg_batch_size", "seg_lr", "seg_crop", "irn_epochs", "irn_lr",
                 "irn_batch_size", "irn_crop", "irn_beta", "dsrg_rounds")
        for k in ("irn_radius", "irn_walk_radius"):
            if getattr(self, k) < 2:
                raise bad(k, f"must be >= 2 (got {getattr(self, k)}): radius 1 has no pixel pairs")
        if not 0 <= self.irn_exp_times <= 16:
            raise bad("irn_exp_times", f"must be in 0..16 (got {self.irn_exp_times}); the walk runs 2^irn_exp_times steps")
        for k in ("cls_batch_size", "seg_batch_size", "irn_batch_size"):  # each rank reads an equal share of a batch
            if self.nproc > 1 and getattr(self, k) % self.nproc:
                raise bad(k, f"must be a multiple of nproc ({self.nproc}), got {getattr(self, k)}")
        if self.synth_size < 32:
            raise bad("synth_size", f"must be >= 32 (got {self.synth_size})")
        for k in ("num_workers", "threads", "subset", "crf_iters", "synth_n_extra", "max_steps", "synth_void_width",
                  "cls_weight_decay", "seg_weight_decay", "recam_lambda", "puzzle_alpha", "sipe_lambda", "seg_val_every",
                  "recipe_list_size", "sipe_grad_clip"):
            if getattr(self, k) < 0:
                raise bad(k, f"must be >= 0 (got {getattr(self, k)!r})")
        for k in ("cls_momentum", "recam_momentum", "sipe_momentum"):
            if not 0 <= getattr(self, k) < 1:
                raise bad(k, f"must be in [0, 1) (got {getattr(self, k)!r}); the official code runs 1e-4, 0.9 is usual")
        if 0 < self.recipe_list_size < self.cls_batch_size:
            raise bad("recipe_list_size", f"must be 0 or at least cls_batch_size ({self.cls_batch_size}); "
                                          f"got {self.recipe_list_size}")
        if (len(self.synth_extent) != 2 or not 0 < self.synth_extent[0] <= self.synth_extent[1] <= 1.5):
            raise bad("synth_extent", f"must be [min, max] with 0 < min <= max <= 1.5 (got {self.synth_extent!r})")
        if not 0 < self.synth_part_size <= 1:
            raise bad("synth_part_size", f"must be in (0, 1] (got {self.synth_part_size!r})")
        if not 0.0 <= self.puzzle_momentum < 1.0:
            raise bad("puzzle_momentum", f"must be in [0, 1) (got {self.puzzle_momentum!r}); 0.0001 is the official "
                                         "code's effective value, 0.9 what its call intended")
        if self.puzzle_nesterov and self.puzzle_momentum == 0:
            raise bad("puzzle_nesterov", "needs puzzle_momentum > 0 (SGD's nesterov has no effect without it); "
                                         "set puzzle_nesterov: false or a positive puzzle_momentum")
        unit("synth_body_tint", "synth_cooccur", "synth_context", "synth_occlusion", "threshold", "conf_fg", "conf_bg",
             "sem_seg_bg_thres")
        unit("dsrg_fg_thres", "dsrg_bg_thres", "dsrg_grow_fg", "dsrg_grow_bg")
        if self.dsrg_bg_thres > self.dsrg_fg_thres:
            raise bad("dsrg_bg_thres", f"must be <= dsrg_fg_thres ({self.dsrg_bg_thres} > {self.dsrg_fg_thres})")
        if self.conf_bg > self.conf_fg:
            raise bad("conf_bg", f"must be <= conf_fg ({self.conf_bg} > {self.conf_fg})")
        _validate_methods(self.methods, bad)
        for key in ("cam_scales", "scorecam_scales"):
            scales = getattr(self, key)
            if not scales or any(s <= 0 for s in scales):
                raise bad(key, "must be a non-empty list of positive scales, e.g. [1.0, 0.5, 1.5]")
        if not self.threshold_sweep or any(not 0 <= t <= 1 for t in self.threshold_sweep):
            raise bad("threshold_sweep", "must be a non-empty list of values in [0, 1]")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def data_path(self) -> Path:
        from .paths import workspace_root

        p = Path(self.data_dir)
        return p if p.is_absolute() else workspace_root() / p


_HINTS = typing.get_type_hints(Params)
#: What error messages name as the origin of a bad value (``params.yaml``, ``--methods``, ...).
_SOURCE: contextvars.ContextVar[str] = contextvars.ContextVar("params_source", default="params.yaml")


@contextlib.contextmanager
def params_source(name: str) -> Iterator[None]:
    """Name ``name`` as the origin of the values in the errors of Params built in this block."""
    token = _SOURCE.set(name)
    try:
        yield
    finally:
        _SOURCE.reset(token)


def _coerce(key: str, value: Any, source: str) -> Any:
    """Check one value against its declared type; ints are accepted where floats are."""
    hint = _HINTS[key]
    origin = typing.get_origin(hint)
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise UserError(f"{source}: key '{key}' must be a mapping of name: name (got {value!r})")
        return dict(value)
    if origin is list:
        (inner,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise UserError(f"{source}: key '{key}' must be a list of {inner.__name__} (got {value!r})")
        return [_coerce_scalar(key, v, inner, source) for v in value]
    return _coerce_scalar(key, value, hint, source)


def _coerce_scalar(key: str, value: Any, typ: type, source: str) -> Any:
    ok = (
        (typ is bool and isinstance(value, bool))
        or (typ is int and isinstance(value, int) and not isinstance(value, bool))
        or (typ is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (typ is str and isinstance(value, str))
    )
    if not ok:
        raise UserError(
            f"{source}: key '{key}' must be of type {typ.__name__} (got {value!r}); fix its value"
        )
    return float(value) if typ is float else value


def params_from_dict(raw: dict[str, Any], source: str = "params.yaml") -> Params:
    if not isinstance(raw, dict):
        raise UserError(f"{source}: must be a YAML mapping of key: value")
    known = {f.name for f in dataclasses.fields(Params)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise UserError(f"{source}: unknown key '{unknown[0]}'; remove it or check its spelling")
    with params_source(source):
        return Params(**raw)


def load_params(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Params:
    """Load and validate ``params.yaml``; ``overrides`` (already typed) win over the file."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: not found; run from the repository root or pass --params PATH")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f" line {line + 1}" if line is not None else ""
        raise UserError(f"{path}:{where} is not valid YAML; fix the syntax") from None
    raw.update(overrides or {})
    return params_from_dict(raw, str(path))


def seed_everything(rng_seed: int, threads: int = 0) -> None:
    """Seed python, numpy and torch and fix torch's CPU thread count (``threads`` > 0), so
    that a step's metrics repeat: float sums are split per thread, and a different split
    rounds differently (a classifier trained with 1 and with 2 threads ends 0.02 mAP apart)."""
    import random

    import numpy as np
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    random.seed(rng_seed)
    np.random.seed(rng_seed)
    torch.manual_seed(rng_seed)
    set_deterministic(True)


def set_deterministic(mode: bool) -> None:
    """``torch.use_deterministic_algorithms(mode, warn_only=True)`` without its import of
    ``torch._inductor.config`` (about 1.9 s per process on this 2-core CPU, paid by every
    pipeline stage), which only sets the flag for ``torch.compile``; nothing here compiles.
    Falls back to the public call where torch lacks the C setter."""
    import torch

    setter = getattr(torch._C, "_set_deterministic_algorithms", None)
    if setter is None:
        torch.use_deterministic_algorithms(mode, warn_only=True)
    else:
        setter(mode, warn_only=True)


def resolve_device(name: str, cuda_amp: bool = False):
    """The torch device of key ``device``: under torchrun the GPU of this process's local rank.
    ``cuda_amp`` also turns on cudnn.benchmark (fastest convolution algorithms for the shapes
    seen; on CUDA this trades bitwise repetition for speed)."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("params.yaml: key 'device' is 'cuda' but no GPU is visible; set device: cpu or auto")
    if name == "cuda":
        from .distributed import local_rank

        torch.backends.cudnn.benchmark = cuda_amp
        if cuda_amp:  # deterministic kernels would undo the point of the fast path
            set_deterministic(False)
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    return torch.device(name)


def cuda_amp_dtype(device, enabled: bool):
    """The autocast dtype of the fast CUDA path: bfloat16 where the GPU supports it, else
    float16 (with a GradScaler); None on CPU or when ``cuda_amp`` is off."""
    import torch

    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
