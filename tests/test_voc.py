"""The VOC reader on a tiny hand-made VOC2012 tree."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsss import voc
from wsss.errors import UserError

IDS = ["2007_000032", "2007_000033", "2008_000001"]
H, W = 12, 16


def _xml(names: list[str]) -> str:
    objects = "".join(f"<object><name>{n}</name><bndbox><xmin>1</xmin><ymin>1</ymin>"
                      f"<xmax>4</xmax><ymax>4</ymax></bndbox></object>" for n in names)
    return f"<annotation><filename>x.jpg</filename>{objects}</annotation>"


def _save_mask(path: Path, mask: np.ndarray) -> None:
    img = Image.fromarray(mask.astype(np.uint8), mode="P")
    img.putpalette(voc.PALETTE)
    img.save(path)


def make_tree(root: Path) -> Path:
    """Three images: person (+void border), cat+dog, background only; train = first two, val = last."""
    for sub in ("JPEGImages", "SegmentationClass", "Annotations", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    masks = [np.zeros((H, W), np.uint8) for _ in IDS]
    masks[0][2:8, 3:9] = voc.VOID
    masks[0][3:7, 4:8] = 15  # person
    masks[1][1:5, 1:5] = 8  # cat
    masks[1][6:10, 8:14] = 12  # dog
    names = [["person"], ["cat", "dog"], []]
    for image_id, mask, objs in zip(IDS, masks, names):
        Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{image_id}.jpg")
        _save_mask(root / "SegmentationClass" / f"{image_id}.png", mask)
        (root / "Annotations" / f"{image_id}.xml").write_text(_xml(objs))
    (root / "ImageSets/Segmentation/train.txt").write_text(f"{IDS[0]}\n{IDS[1]}\n")
    (root / "ImageSets/Segmentation/val.txt").write_text(f"{IDS[2]}\n\n")
    return root


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "VOC2012")


def onehot(*names: str) -> np.ndarray:
    v = np.zeros(20, np.float32)
    for n in names:
        v[voc.CLASSES.index(n)] = 1
    return v


# ------------------------------------------------------------------ constants
def test_classes_and_palette():
    assert len(voc.CLASSES) == voc.NUM_CLASSES == 20
    assert voc.CLASSES[0] == "aeroplane" and voc.CLASSES[14] == "person" and voc.CLASSES[-1] == "tvmonitor"
    assert (voc.VOID, voc.BACKGROUND) == (255, 0)
    pal = voc.PALETTE
    assert len(pal) == 768
    rgb = lambda i: tuple(pal[3 * i: 3 * i + 3])  # noqa: E731
    assert rgb(0) == (0, 0, 0)
    assert rgb(1) == (128, 0, 0)
    assert rgb(15) == (192, 128, 128)
    assert rgb(20) == (0, 64, 128)
    assert rgb(255) == (224, 224, 192)


# ------------------------------------------------------------------ reading
def test_read_split_and_subset(root):
    assert voc.read_split(root, "train") == IDS[:2]
    assert voc.read_split(root, "val") == IDS[2:]
    ds = voc.VOCDataset(root, "train", subset=1)
    assert ds.ids == IDS[:1] and len(ds) == 1 and ds.root == root and ds.split == "train"
    assert len(voc.VOCDataset(root, "train", subset=0)) == 2


def test_read_split_accepts_path_style_lines(root):
    (root / "ImageSets/Segmentation/train_aug.txt").write_text(
        f"/JPEGImages/{IDS[0]}.jpg /SegmentationClassAug/{IDS[0]}.png\n")
    assert voc.read_split(root, "train_aug") == [IDS[0]]


def test_image_mask_and_labels(root):
    ds = voc.VOCDataset(root, "train")
    img = ds.image(IDS[0])
    assert img.shape == (H, W, 3) and img.dtype == np.uint8
    m = ds.mask(IDS[0])
    assert m.shape == (H, W) and m.dtype == np.uint8
    assert set(np.unique(m)) == {0, 15, 255}  # indices, not palette colours
    assert ds.has_masks
    np.testing.assert_array_equal(ds.labels(IDS[0]), onehot("person"))
    np.testing.assert_array_equal(ds.labels(IDS[1]), onehot("cat", "dog"))
    assert ds.labels(IDS[1]).dtype == np.float32 and ds.labels(IDS[1]).shape == (20,)


def test_mask_prefers_segmentation_class_aug(root):
    (root / "SegmentationClassAug").mkdir()
    aug = np.full((H, W), 3, np.uint8)
    Image.fromarray(aug, mode="L").save(root / "SegmentationClassAug" / f"{IDS[0]}.png")
    ds = voc.VOCDataset(root, "train")
    np.testing.assert_array_equal(ds.mask(IDS[0]), aug)
    assert set(np.unique(ds.mask(IDS[1]))) == {0, 8, 12}  # falls back to SegmentationClass


def test_labels_fall_back_to_mask(root):
    (root / "Annotations" / f"{IDS[1]}.xml").unlink()
    np.testing.assert_array_equal(voc.VOCDataset(root, "train").labels(IDS[1]), onehot("cat", "dog"))
    np.testing.assert_array_equal(voc.labels_from_mask(np.array([[0, 255, 7, 21]])), onehot("car"))


def test_labels_from_xml(root):
    np.testing.assert_array_equal(voc.labels_from_xml(root / "Annotations" / f"{IDS[1]}.xml"), onehot("cat", "dog"))
    np.testing.assert_array_equal(voc.labels_from_xml(root / "Annotations" / f"{IDS[2]}.xml"), np.zeros(20))


def test_cls_labels_round_trip_and_priority(root):
    labels = {IDS[0]: onehot("bus"), IDS[1]: onehot("cow", "sheep")}
    path = root / "cls_labels.npy"
    voc.save_cls_labels(path, labels)
    raw = np.load(path, allow_pickle=True).item()
    assert sorted(raw) == [2007000032, 2007000033]  # the IRN int-key format
    back = voc.load_cls_labels(path)
    assert sorted(back) == sorted(labels)
    for k in labels:
        np.testing.assert_array_equal(back[k], labels[k])
        assert back[k].dtype == np.float32
    # cls_labels.npy wins over the XML; ids missing from it fall back to the XML
    ds = voc.VOCDataset(root, "train")
    np.testing.assert_array_equal(ds.labels(IDS[0]), onehot("bus"))
    val = voc.VOCDataset(root, "val")
    np.testing.assert_array_equal(val.labels(IDS[2]), np.zeros(20))
    assert not list(root.glob(".cls_labels*"))  # nothing half-written left


def test_cls_labels_short_int_ids(tmp_path):
    path = tmp_path / "cls.npy"
    np.save(path, {12345: np.ones(20, np.float32)})
    assert list(voc.load_cls_labels(path)) == ["12345"]


# ------------------------------------------------------------------ bad inputs
def _raises_naming(fn, needle: str) -> str:
    with pytest.raises(UserError) as e:
        fn()
    msg = str(e.value)
    assert needle in msg, msg
    assert "\n" not in msg
    return msg


def test_missing_split_lists_existing(root):
    msg = _raises_naming(lambda: voc.read_split(root, "trainval"), "trainval.txt")
    assert "train" in msg and "val" in msg
    _raises_naming(lambda: voc.VOCDataset(root, "test"), "test.txt")


def test_missing_image(root):
    (root / "JPEGImages" / f"{IDS[0]}.jpg").unlink()
    _raises_naming(lambda: voc.VOCDataset(root, "train").image(IDS[0]), f"{IDS[0]}.jpg")


def test_corrupt_jpg(root):
    path = root / "JPEGImages" / f"{IDS[0]}.jpg"
    path.write_bytes(b"not a jpeg at all")
    _raises_naming(lambda: voc.VOCDataset(root, "train").image(IDS[0]), f"{IDS[0]}.jpg")


def test_truncated_jpg(root):
    path = root / "JPEGImages" / f"{IDS[1]}.jpg"
    path.write_bytes(path.read_bytes()[:200])
    _raises_naming(lambda: voc.VOCDataset(root, "train").image(IDS[1]), f"{IDS[1]}.jpg")


def test_mask_wrong_size(root):
    _save_mask(root / "SegmentationClass" / f"{IDS[0]}.png", np.zeros((H + 1, W), np.uint8))
    _raises_naming(lambda: voc.VOCDataset(root, "train").mask(IDS[0]), f"{IDS[0]}.png")


def test_mask_label_outside_palette(root):
    bad = np.zeros((H, W), np.uint8)
    bad[0, 0] = 37
    _save_mask(root / "SegmentationClass" / f"{IDS[1]}.png", bad)
    msg = _raises_naming(lambda: voc.VOCDataset(root, "train").mask(IDS[1]), f"{IDS[1]}.png")
    assert "37" in msg


def test_rgb_mask_rejected(root):
    Image.new("RGB", (W, H), (128, 0, 0)).save(root / "SegmentationClass" / f"{IDS[0]}.png")
    _raises_naming(lambda: voc.VOCDataset(root, "train").mask(IDS[0]), f"{IDS[0]}.png")


def test_unknown_xml_class(root):
    (root / "Annotations" / f"{IDS[1]}.xml").write_text(_xml(["cat", "unicorn"]))
    msg = _raises_naming(lambda: voc.VOCDataset(root, "train").labels(IDS[1]), f"{IDS[1]}.xml")
    assert "unicorn" in msg


def test_missing_mask(root):
    (root / "SegmentationClass" / f"{IDS[0]}.png").unlink()
    ds = voc.VOCDataset(root, "train")
    assert not ds.has_masks
    _raises_naming(lambda: ds.mask(IDS[0]), f"{IDS[0]}.png")


# ------------------------------------------------------------------ check / validate
def test_check_clean_tree(root):
    report = voc.check(root)
    assert report["problems"] == []
    assert report["splits"] == {"train": 2, "val": 1}
    assert report["class_counts"]["train"]["person"] == 1
    assert report["class_counts"]["train"]["cat"] == 1
    assert sum(report["class_counts"]["val"].values()) == 0
    voc.validate(root, ["train", "val"])


def test_check_collects_every_problem(root):
    (root / "JPEGImages" / f"{IDS[0]}.jpg").write_bytes(b"garbage")
    bad = np.zeros((H, W), np.uint8)
    bad[1, 1] = 37
    _save_mask(root / "SegmentationClass" / f"{IDS[1]}.png", bad)
    (root / "Annotations" / f"{IDS[1]}.xml").write_text(_xml(["unicorn"]))
    (root / "SegmentationClass" / f"{IDS[2]}.png").unlink()
    (root / "ImageSets/Segmentation/extra.txt").write_text("2009_999999\n")
    report = voc.check(root)  # never raises
    problems = report["problems"]
    assert all("\n" not in p for p in problems)

    def has(*needles: str) -> bool:
        return any(all(n in p for n in needles) for p in problems)

    assert has(f"{IDS[0]}.jpg", "corrupt")
    assert has(f"{IDS[1]}.png", "37")
    assert has(f"{IDS[1]}.xml", "unicorn")
    assert has(f"{IDS[2]}.png", "not found")  # val needs masks when SegmentationClass exists
    assert has("2009_999999.jpg", "not found")
    assert not has("2009_999999.png")  # a split other than train/val may lack masks
    assert report["splits"] == {"extra": 1, "train": 2, "val": 1}

    with pytest.raises(UserError, match=f"{IDS[0]}.jpg"):
        voc.validate(root, ["train"])
    with pytest.raises(UserError, match=f"{IDS[2]}.png"):
        voc.validate(root, ["val"])
    with pytest.raises(UserError, match="nope.txt"):
        voc.validate(root, ["nope"])


def test_check_mask_wrong_size_and_missing_folders(root, tmp_path):
    _save_mask(root / "SegmentationClass" / f"{IDS[0]}.png", np.zeros((H, W + 3), np.uint8))
    assert any(f"{IDS[0]}.png" in p and "19x12" in p for p in voc.check(root)["problems"])
    empty = tmp_path / "empty"
    empty.mkdir()
    problems = voc.check(empty)["problems"]
    assert any("JPEGImages" in p for p in problems)
    assert any("ImageSets" in p for p in problems)
    assert voc.check(tmp_path / "absent")["problems"]


# ------------------------------------------------------------------ link_voc
def test_link_voc(tmp_path):
    devkit = tmp_path / "VOCdevkit"
    make_tree(devkit / "VOC2012")
    dst = tmp_path / "data" / "VOC2012"
    report = voc.link_voc(devkit, dst)
    assert dst.is_symlink() and (dst / "JPEGImages").is_dir()
    assert report["splits"] == {"train": 2, "val": 1} and report["problems"] == []
    # relinking replaces the symlink; the VOC2012 folder itself is accepted too
    other = make_tree(tmp_path / "other" / "VOC2012")
    voc.link_voc(other, dst)
    assert dst.resolve() == other.resolve()


def test_link_voc_refuses(tmp_path):
    src = tmp_path / "notvoc"
    src.mkdir()
    with pytest.raises(UserError, match="JPEGImages"):
        voc.link_voc(src, tmp_path / "dst")
    real = make_tree(tmp_path / "VOC2012")
    dst = tmp_path / "data" / "VOC2012"
    dst.mkdir(parents=True)
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="move it away"):
        voc.link_voc(real, dst)
    assert (dst / "keep.txt").read_text() == "mine"
