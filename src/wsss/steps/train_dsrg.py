"""Step ``train-dsrg``: a segmentation network trained directly from a method's sparse seeds by
Deep Seeded Region Growing (Huang, Wang, Wang, Liu & Wang, "Weakly-Supervised Semantic
Segmentation Network with Deep Seeded Region Growing", CVPR 2018; the DSRG notes of
../shared/SEEDS.md; official Caffe code speedinghzl/DSRG).

Round 1 (DSRG training), per optimiser step:

1. **Seeds** (:func:`wsss.dsrg.make_seeds`, once per image from ``outputs/seeds/<method>/``):
   class c where c is the argmax of the present classes' CAMs and that CAM > ``dsrg_fg_thres``;
   background where every present CAM < ``dsrg_bg_thres``; the rest unlabeled. DSRG took its
   background from a saliency model (DRFI); offline there is none, so by default the CAMs give
   it; ``dsrg_saliency_dir`` takes the background from a user's saliency maps instead.
2. The network's softmax at its **output resolution** (stride 4 with ``seg_decoder: v3plus``,
   16 without; DSRG: 41 x 41 for 321 px), floored at 1e-4 and renormalised (official
   SoftmaxLayer); the seed crop is subsampled (nearest) to it.
3. **Dense CRF** of that softmax with the image bilinearly resized to the same size, on a process
   pool over the batch (``num_workers``), spatial kernels scaled with the resolution
   (:func:`wsss.dsrg.crf_refine`).
4. **Seeded region growing** from the original seeds (:func:`wsss.dsrg.grow_seeds`): unlabeled
   pixels join the present label that is their argmax with probability > ``dsrg_grow_fg`` (a
   class) / ``dsrg_grow_bg`` (background), only in 8-connected regions touching a seed of that
   label. It reads the CRF-refined probabilities (``dsrg_grow_on: crf``, as the official
   UpdateSeedLayer3) or the softmax (``softmax``, the paper's H).
5. Loss = **balanced seed loss** on the grown seeds (:func:`seed_loss`) + **boundary loss**
   KL(CRF || softmax) (:func:`boundary_loss`), both with weight 1 as the official prototxt.

Rounds 2.. (``dsrg_rounds``; official run.sh: model-s, then model-f from its weights): the
network's predictions on the training list (full image, flip, dense CRF as the official
``--smooth true``) become the labels of a plain cross-entropy training that continues from the
previous round's weights.

Same network, initialisation and schedule as train-seg (``seg_*``: steps, batch, crop, lr, poly
decay, 10x on the head), so the comparison with CRF-mask training isolates the training method.
The official recipe is 8,000 steps of 20 images (~15 passes over VOC train_aug, 9,915 steps at
batch 16 under the harness's ``recipe_list_size`` rule) for round 1 and 20,000 for round 2; we
keep train-seg's ``seg_epochs`` over the list instead (500 steps on the default world), which
is what CRF-mask training runs, at a twentieth of the cost.

Writes ``outputs/checkpoints/seg-dsrg-<method>.pt`` (scored by eval-dsrg),
``outputs/metrics/train_dsrg/<method>.json`` (with the per-epoch seed growth curve) and
``outputs/plots/dsrg_growth/<method>.csv``; per-epoch MLflow metrics: loss terms, seed coverage
(labelled fraction of image pixels) and seed precision (agreement with the ground truth of
``seed_split`` where it has one), before and after growing, on the training crops at output
resolution.
"""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .. import methods
from ..config import Params, resolve_device, seed_everything
from ..datasets import SegmentationData, random_scale_flip_crop, to_tensor
from ..distributed import is_main
from ..dsrg import MIN_PROB, crf_and_grow, make_seeds, seed_scores
from ..errors import UserError
from ..io import load_torch, save_label_png, write_json, write_text
from ..metrics import ConfusionMatrix
from ..models.deeplab import build_deeplab, predict_probs
from ..tracking import step_run
from ..trainer import LoopSpec, fingerprint, spec_schedule, train_loop
from ..voc import NUM_LABELS, PALETTE, VOID
from .common import checkpoint_path, open_split, out_dir, read_seed, summary
from .crf import pool_context, resolve_workers, seed_path
from .train_seg import TRAINING_KEYS, init_from_classifier, pixel_ce_step, quick_val_miou, validation_epochs

DSRG_KEYS = ("dsrg_fg_thres", "dsrg_bg_thres", "dsrg_saliency_dir", "dsrg_grow_fg", "dsrg_grow_bg", "dsrg_grow_on",
             "seg_init")
#: The official ConstrainLossLayer clips the ratio Q / P to [0.05, 20] inside the log.
RATIO_CLIP = (0.05, 20.0)
#: Growth-curve columns (outputs/plots/dsrg_growth/<method>.csv).
CURVE = ("coverage_before", "coverage_after", "precision_before", "precision_after")


# ----------------------------------------------------------------------------- losses
def floored_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over dim 1 plus 1e-4, renormalised (official SoftmaxLayer): log stays finite."""
    p = logits.float().softmax(1) + MIN_PROB
    return p / p.sum(1, keepdim=True)


def seed_loss(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Balanced seed loss (DSRG Eq. 1; official SeedLossLayer3): for each image the mean of
    -log H_{u,c} over its background seed pixels plus the mean over its foreground seed pixels
    (each normalised by its own count; an image without seeds of a kind adds 0 to that term),
    both terms averaged over the batch. ``probs`` (B, L, h, w), ``labels`` (B, h, w) with 0,
    c + 1 and 255."""
    logp = probs.clamp_min(1e-12).log()
    known = labels != VOID
    picked = logp.gather(1, torch.where(known, labels, 0).long()[:, None])[:, 0]
    total = probs.new_zeros(())
    for mask in (labels == 0, known & (labels > 0)):
        m = mask.float()
        total = total - ((picked * m).sum((1, 2)) / m.sum((1, 2)).clamp_min(1.0)).mean()
    return total


def boundary_loss(probs: torch.Tensor, refined: torch.Tensor) -> torch.Tensor:
    """Constrain-to-boundary loss (SEC, Kolesnikov & Lampert 2016; DSRG Eq. 4): the mean over
    pixels and images of KL(Q || P) = sum_c Q log(Q / P), Q the dense-CRF refinement of P, held
    constant. The ratio is clipped to [0.05, 20] as the official ConstrainLossLayer."""
    q = refined.detach()
    return (q * (q / probs).clamp(*RATIO_CLIP).log()).sum(1).mean()


# ----------------------------------------------------------------------------- data
def _saliency(params: Params, image_id: str, shape: tuple[int, int]) -> np.ndarray | None:
    if not params.dsrg_saliency_dir:
        return None
    from PIL import Image

    from ..paths import workspace_root

    root = Path(params.dsrg_saliency_dir)
    path = (root if root.is_absolute() else workspace_root() / root) / f"{image_id}.png"
    if not path.is_file():
        raise UserError(f"{path}: saliency map missing; add <id>.png for every id or set key 'dsrg_saliency_dir' "
                        f"to \"\" (background from the CAMs)")
    sal = np.asarray(Image.open(path).convert("L"), np.float32) / 255.0
    if sal.shape != tuple(shape):
        raise UserError(f"{path}: saliency map is {sal.shape}, the image {tuple(shape)}; give one at image size")
    return sal


def load_seed_maps(params: Params, voc, method: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Seed maps (uint8 HxW) and present labels (0 and c + 1) of every id, from the seed files."""
    missing = [i for i in voc.ids if not seed_path(method, i).is_file()]
    if missing:
        raise UserError(f"{seed_path(method, missing[0])}: seed file missing ({len(missing)} of {len(voc.ids)} ids "
                        f"have none); run `python cli.py seeds --method {method}` first")
    seeds, present = [], []
    for i in voc.ids:
        shape = voc.image_size(i)
        keys, cams = read_seed(seed_path(method, i), method, shape)
        seeds.append(make_seeds(keys, cams, params.dsrg_fg_thres, params.dsrg_bg_thres, _saliency(params, i, shape)))
        present.append(np.concatenate([[0], keys + 1]).astype(np.int64))
    return seeds, present


def _seed_fingerprint(method: str, ids: list[str]) -> str:
    h = hashlib.sha1()
    for i in ids:
        st = seed_path(method, i).stat()
        h.update(f"{i}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


class SeedData(Dataset):
    """(normalised crop, uint8 crop, seed crop, ground-truth crop, valid mask, present labels):
    the seeds and the ground truth (all 255 where a split has no mask) cut with the same random
    scale, flip and crop as the image (IRN/ReCAM augmentation, as train-seg); ``valid`` marks
    image pixels, False on crop padding. Deterministic per (rng_seed, epoch, index)."""

    def __init__(self, voc, crop: int, seeds: list[np.ndarray], present: list[np.ndarray], rng_seed: int = 0):
        self.crop, self.rng_seed, self.epoch = crop, rng_seed, 0
        self.images = [voc.image(i) for i in voc.ids]
        self.seeds = seeds
        self.gts = [voc.mask(i) if voc.mask_path(i).is_file() else None for i in voc.ids]
        self.present = []
        for p in present:
            hot = np.zeros(NUM_LABELS, bool)
            hot[p] = True
            self.present.append(hot)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, idx: int):
        key = (self.rng_seed, self.epoch, idx)
        image, seed = random_scale_flip_crop(np.random.default_rng(key), self.images[idx], self.seeds[idx], self.crop)
        gt = self.gts[idx] if self.gts[idx] is not None else np.full(self.seeds[idx].shape, VOID, np.uint8)
        ones = np.full(self.images[idx].shape, 255, np.uint8)
        area, gt = random_scale_flip_crop(np.random.default_rng(key), ones, gt, self.crop)  # same draws
        # the crop may be a view of a read-only array: torch.tensor copies (no warning, same values)
        return (to_tensor(image), torch.tensor(image), torch.from_numpy(seed.astype(np.int64)),
                torch.from_numpy(gt.astype(np.int64)), torch.from_numpy(area[..., 0] > 127),
                torch.from_numpy(self.present[idx]))


def _subsample(t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest subsampling of a (B, H, W) label tensor to ``size``."""
    return F.interpolate(t[:, None].float(), size=size, mode="nearest")[:, 0].to(t.dtype)


# ----------------------------------------------------------------------------- CRF pool
_POOL: dict = {}


def _init_pool(params: Params) -> None:
    _POOL["params"] = params


def _grow_job(job: tuple) -> tuple[np.ndarray, np.ndarray]:
    image, probs, seed, present, scale = job
    params = _POOL["params"]
    return crf_and_grow(image, probs, seed, present, params, scale, params.dsrg_grow_on)


def _label_job(job: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    from ..crf import crf_postprocess

    image, probs = job
    return crf_postprocess(image, probs, _POOL["params"])


def _map(pool, fn, jobs: list) -> list:
    return pool.map(fn, jobs) if pool is not None else [fn(j) for j in jobs]


# ----------------------------------------------------------------------------- steps
class GrowthCurve:
    """Per-epoch sums of the seed counts (:func:`wsss.dsrg.seed_scores`) before and after growing."""

    def __init__(self):
        self.epochs: dict[int, dict[str, float]] = {}

    def add(self, epoch: int, when: str, counts: dict[str, float]) -> None:
        row = self.epochs.setdefault(epoch, {})
        for k, v in counts.items():
            row[f"{k}_{when}"] = row.get(f"{k}_{when}", 0.0) + v

    def row(self, epoch: int) -> dict[str, float]:
        return rates(self.epochs.get(epoch, {}))


def rates(c: dict[str, float]) -> dict[str, float]:
    """Coverage (labelled / image pixels) and precision (correct / judged) from summed counts."""
    out = {}
    for when in ("before", "after"):
        if c.get(f"pixels_{when}"):
            out[f"coverage_{when}"] = c[f"labelled_{when}"] / c[f"pixels_{when}"]
        if c.get(f"judged_{when}"):
            out[f"precision_{when}"] = c[f"correct_{when}"] / c[f"judged_{when}"]
    return out


def dsrg_step(pool, curve: GrowthCurve, steps_per_epoch: int):
    """The step function of round 1 (see the module docstring)."""

    def step_fn(m, batch, step):
        x, image, seed, gt, valid, present = batch
        logits = m.head(m.backbone(x))  # the network's output resolution
        size = tuple(logits.shape[-2:])
        probs = floored_softmax(logits)
        seed_s, gt_s, valid_s = _subsample(seed, size), _subsample(gt, size), _subsample(valid, size)
        small = F.interpolate(image.permute(0, 3, 1, 2).float(), size=size, mode="bilinear", align_corners=False)
        small = small.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        p_np = probs.detach().cpu().numpy()
        s_np = seed_s.cpu().numpy().astype(np.uint8)
        scale = size[0] / x.shape[-2]
        jobs = [(small[i], p_np[i], s_np[i], np.flatnonzero(present[i].cpu().numpy()), scale) for i in range(len(x))]
        results = _map(pool, _grow_job, jobs)
        refined = torch.from_numpy(np.stack([r[0] for r in results])).to(probs.device)
        grown = torch.from_numpy(np.stack([r[1] for r in results]).astype(np.int64)).to(probs.device)
        l_seed, l_bd = seed_loss(probs, grown), boundary_loss(probs, refined)
        loss = l_seed + l_bd
        counts: dict[str, dict[str, float]] = {"before": {}, "after": {}}
        g_np, v_np = gt_s.cpu().numpy(), valid_s.cpu().numpy()
        for when, maps in (("before", s_np), ("after", grown.cpu().numpy())):
            for i in range(len(x)):
                has_gt = bool((g_np[i] != VOID).any())
                for k, v in seed_scores(maps[i], v_np[i], g_np[i] if has_gt else None).items():
                    counts[when][k] = counts[when].get(k, 0.0) + v
            curve.add(step // steps_per_epoch, when, counts[when])
        logs = {"loss": loss.item(), "seed_loss": l_seed.item(), "boundary_loss": l_bd.item(),
                **rates({f"{k}_{w}": v for w in counts for k, v in counts[w].items()})}
        return loss, logs

    return step_fn


#: Rounds 2..: pixel-wise cross-entropy on the previous round's predictions, normalised by the
#: labelled pixels of the whole batch under DDP as train-seg's
ce_step = pixel_ce_step


@torch.no_grad()
def predict_labels(model, voc, device, pool) -> list[np.ndarray]:
    """Label maps of the training list by the trained network (full image, flip, dense CRF)."""
    images = [voc.image(i) for i in voc.ids]
    probs = [predict_probs(model, im, device, flip=True) for im in images]
    return _map(pool, _label_job, list(zip(images, probs)))


class _Prefixed:
    """A tracker whose metric names carry a prefix (the rounds after the first)."""

    def __init__(self, tracker, prefix: str):
        self._t, self._prefix = tracker, prefix

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        self._t.log_metrics({f"{self._prefix}{k}": v for k, v in metrics.items()}, step=step)

    def __getattr__(self, name):
        return getattr(self._t, name)


def _finished_round(path: Path, fp: str) -> dict | None:
    """A round checkpoint with fingerprint ``fp`` (a rerun after a crash in a later round does
    not repeat it), else None."""
    if not path.is_file():
        return None
    try:
        ckpt = load_torch(path, "DSRG round checkpoint", "training the round again")
    except UserError:
        return None
    return ckpt if ckpt.get("fingerprint") == fp else None


def write_curve(path: Path, curve: list[dict]) -> None:
    lines = ["epoch," + ",".join(CURVE)]
    for row in curve:
        lines.append(f"{row['epoch']}," + ",".join(f"{row[k]:.6f}" if k in row else "" for k in CURVE))
    write_text(path, "\n".join(lines) + "\n")


def run(params: Params, method: str) -> dict:
    methods.get(method)  # one clear error for an unknown method
    seed_everything(params.seed, params.threads)
    device = resolve_device(params.device, params.cuda_amp)
    train = open_split(params, params.seed_split)
    if len(train) < params.seg_batch_size:
        raise UserError(f"split '{train.split}' has {len(train)} images, fewer than seg_batch_size "
                        f"{params.seg_batch_size}; lower key 'seg_batch_size'")
    seeds, present = load_seed_maps(params, train, method)
    val = open_split(params, params.val_split)
    keys = {k: getattr(params, k) for k in TRAINING_KEYS + DSRG_KEYS}
    keys.update(split=params.seed_split, method=method, seeds=_seed_fingerprint(method, list(train.ids)))
    workers = min(resolve_workers(params), params.seg_batch_size)
    # the pool is forked before the network exists, so no worker inherits busy torch threads
    pool_cm = (pool_context().Pool(workers, initializer=_init_pool, initargs=(params,))
               if workers > 1 else contextlib.nullcontext())
    final_name = f"seg-dsrg-{method}"
    with pool_cm as pool, step_run("train-dsrg", params, method=method) as tracker:
        _init_pool(params)
        model = build_deeplab(params)
        if params.seg_init == "cls":
            keys["init"] = init_from_classifier(model, params)
        data = SeedData(train, params.seg_crop, seeds, present, params.seed)
        val_epochs = validation_epochs(params, len(data))
        metrics: dict = {"method": method, "n_train": len(train), "rounds": params.dsrg_rounds}
        curve: list[dict] = []
        for r in range(1, params.dsrg_rounds + 1):
            name = final_name if r == params.dsrg_rounds else f"{final_name}.round{r}"
            spec = LoopSpec(name, params.seg_epochs, params.seg_lr, params.seg_batch_size, params.seg_weight_decay,
                            params.max_steps, {**keys, "round": r}, batch_key="seg_batch_size",
                            sync_bn=params.sync_bn, cuda_amp=params.cuda_amp)
            done = _finished_round(checkpoint_path(name), fingerprint(spec.fingerprint_keys)) if r < params.dsrg_rounds else None
            round_tracker = tracker if r == 1 else _Prefixed(tracker, f"round{r}_")
            epoch_end = (lambda m, e: quick_val_miou(m, val, device) if e in val_epochs else {})
            growth = GrowthCurve()
            if done is not None:
                model.load_state_dict(done["model"])
                model.to(device)
                growth.epochs = done.get("growth", {})
                logs = {"steps": float(done["steps"])}
            elif r == 1:
                spe = spec_schedule(spec, len(data))[0]
                logs = train_loop(spec, model, data, dsrg_step(pool, growth, spe), out_dir("checkpoints"), device,
                                  round_tracker, params.seed, new_prefixes=("head",), epoch_end=epoch_end,
                                  extra_state={"growth": growth.epochs})  # filled while training
            else:
                logs = train_loop(spec, model, data, ce_step, out_dir("checkpoints"), device, round_tracker,
                                  params.seed, new_prefixes=("head",), epoch_end=epoch_end)
            if r == 1:
                curve = [{"epoch": e + 1, **growth.row(e)} for e in sorted(growth.epochs)]
            prefix = "" if r == 1 else f"round{r}_"
            metrics.update({f"{prefix}loss": logs.get("loss"), f"{prefix}steps": int(logs["steps"]),
                            f"{prefix}val_miou_quick": logs.get("val_miou")})
            if r == 1:
                metrics.update({k: logs.get(k) for k in ("seed_loss", "boundary_loss", *CURVE)})
            if r < params.dsrg_rounds:  # this round's predictions become the next round's labels
                labels = predict_labels(model, train, device, pool)
                cm = ConfusionMatrix(NUM_LABELS)
                for i, lab in zip(train.ids, labels):
                    if train.mask_path(i).is_file():
                        cm.update(lab, train.mask(i))
                if cm.mat.sum():
                    metrics[f"round{r}_train_miou"] = cm.scores()["miou"]
                with tempfile.TemporaryDirectory(dir=out_dir("checkpoints"), prefix=".dsrg-labels-") as tmp:
                    for i, lab in zip(train.ids, labels):
                        save_label_png(Path(tmp) / f"{i}.png", lab, PALETTE)
                    data = SegmentationData(train, params.seg_crop, Path(tmp), params.seed)
        for r in range(1, params.dsrg_rounds):  # the intermediate rounds' checkpoints are not outputs
            checkpoint_path(f"{final_name}.round{r}").unlink(missing_ok=True)
        metrics["growth_curve"] = curve
        clean = {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in metrics.items()}
        tracker.log_metrics({f"final_{k}": v for k, v in clean.items()
                             if isinstance(v, (int, float)) and not isinstance(v, bool)})
        if is_main():
            write_json(out_dir("metrics", "train_dsrg", f"{method}.json"), clean)
            write_curve(out_dir("plots", "dsrg_growth", f"{method}.csv"), curve)
    last = curve[-1] if curve else {}
    val_key = "val_miou_quick" if params.dsrg_rounds == 1 else f"round{params.dsrg_rounds}_val_miou_quick"
    summary("train-dsrg", f"{method}: {params.dsrg_rounds} round(s) on {len(train)} images; seed coverage "
                          f"{last.get('coverage_before', float('nan')):.1%} -> {last.get('coverage_after', float('nan')):.1%} "
                          f"by growing (last epoch); quick val mIoU {metrics.get(val_key) or float('nan'):.3f}")
    return metrics
