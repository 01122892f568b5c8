"""CAM methods: golden values, Score-CAM fast path vs reference, batch APIs, TTA, registry."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wsss.cams import (CAM, CAMMethod, GradCAM, GradCAMPlusPlus, Method, ReCAM, ScoreCAM,
                       ScoreCAMReference, get_method, scorecam_batch, study_scorecam_batch)
from wsss.cams.scorecam import scorecam_scores
from wsss.config import Params
from wsss.errors import UserError

K = 20


class TinyNet(nn.Module):
    """The Classifier interface (features/head/forward/cam_weight/raw_cams) on a tiny CNN."""

    def __init__(self, channels: int = 8, seed: int = 0, bn: bool = False, pool: str = "stride"):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        stride = 2 if pool == "stride" else 1
        self.conv1 = nn.Conv2d(3, 6, 3, stride=stride, padding=1)
        self.conv2 = nn.Conv2d(6, channels, 3, stride=stride, padding=1)
        self.bn = nn.BatchNorm2d(6) if bn else nn.Identity()
        self.pool = nn.AvgPool2d(2) if pool == "avg" else nn.Identity()
        self.classifier = nn.Conv2d(channels, K, 1, bias=False)
        self.recam_predictor: nn.Conv2d | None = None
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def features(self, x):
        return F.relu(self.conv2(self.pool(F.relu(self.bn(self.conv1(x))))))

    def head(self, feats):
        return self.classifier(feats.mean(dim=(2, 3), keepdim=True)).flatten(1)

    def forward(self, x):
        return self.head(self.features(x))

    def cam_weight(self, reactivate: bool = False):
        w = self.classifier.weight
        if reactivate:
            if self.recam_predictor is None:
                raise UserError("no ReCAM predictor")
            w = w * self.recam_predictor.weight
        return w

    def raw_cams(self, feats, reactivate: bool = False):
        return F.relu(F.conv2d(feats, self.cam_weight(reactivate)))


class IdentityNet(TinyNet):
    """features(x) = x: the 'image' is the feature map."""

    def __init__(self, W: torch.Tensor):
        super().__init__()
        self.classifier = nn.Conv2d(W.shape[1], W.shape[0], 1, bias=False)
        with torch.no_grad():
            self.classifier.weight.copy_(W[:, :, None, None])

    def features(self, x):
        return x


def params(**kw) -> Params:
    return Params(**{"cam_scales": [1.0], "cam_flip": False, **kw})


def rand_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def rand_x(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randn((b, 3, h, w), generator=torch.Generator().manual_seed(seed))


def with_constant_channel(net: TinyNet, k: int) -> TinyNet:
    with torch.no_grad():
        net.conv2.weight[k] = 0.0
        net.conv2.bias[k] = 0.7
    return net


# ---------------------------------------------------------------------- CAM
def test_cam_golden_2x2():
    W = torch.tensor([[1.0, 2.0], [-1.0, 1.0]])  # 2 classes x 2 channels
    A = torch.tensor([[[1.0, -2.0], [3.0, 0.0]],
                      [[0.5, 1.0], [-1.0, 2.0]]])[None]
    cam = CAM(IdentityNet(W), params())
    got = cam.maps(A, torch.tensor([0, 1]))
    expect = torch.tensor([[[2.0, 0.0], [1.0, 4.0]],   # ReLU(A0 + 2 A1)
                           [[0.0, 3.0], [0.0, 2.0]]])  # ReLU(-A0 + A1)
    assert torch.equal(got, expect)
    assert torch.equal(cam.maps(A, torch.tensor([1])), expect[1:])


def test_recam_uses_product_of_classifiers():
    W = torch.tensor([[1.0, 2.0], [-1.0, 1.0]])
    net = IdentityNet(W)
    with pytest.raises(UserError):
        ReCAM(net, params())
    net.recam_predictor = nn.Conv2d(2, 2, 1, bias=False)
    with torch.no_grad():
        net.recam_predictor.weight.copy_(torch.tensor([[2.0, 0.0], [1.0, -1.0]])[:, :, None, None])
    A = torch.tensor([[[1.0, -2.0], [3.0, 0.0]], [[0.5, 1.0], [-1.0, 2.0]]])[None]
    got = ReCAM(net, params()).maps(A, torch.tensor([0, 1]))
    # weights W * P = [[2, 0], [-1, -1]]
    expect = torch.stack([F.relu(2 * A[0, 0]), F.relu(-A[0, 0] - A[0, 1])])
    assert torch.equal(got, expect)


# ---------------------------------------------------------------------- Grad-CAM(++)
def test_gradcam_equals_cam_over_hw_for_gap_linear_head():
    net = TinyNet(seed=1)
    x = rand_x(1, 24, 20)
    classes = torch.tensor([0, 5, 19])
    cam = CAM(net, params()).maps(x, classes)
    grad = GradCAM(net, params()).maps(x, classes)
    h, w = net.features(x).shape[-2:]
    torch.testing.assert_close(grad, cam / (h * w), rtol=1e-5, atol=1e-7)


def test_gradcam_works_on_hooked_layer_and_inside_inference_mode():
    from wsss.models.classifier import Classifier

    torch.manual_seed(0)
    model = Classifier("resnet18", 16)
    method = GradCAM(model, params(), target_layer="layer3")
    x = rand_x(1, 40, 40)
    with torch.inference_mode():
        m = method.maps(x, torch.tensor([1, 2]))
    assert m.shape == (2, 3, 3) and torch.isfinite(m).all() and (m >= 0).all()
    assert not model.backbone.layer3._forward_hooks  # the hook was removed
    # on the last layer the hook path matches the default path
    a = GradCAM(model, params(), target_layer="layer4").maps(x, torch.tensor([3]))
    b = GradCAM(model, params()).maps(x, torch.tensor([3]))
    torch.testing.assert_close(a, b)


def test_gradcampp_finite_nonnegative_and_normalised():
    net = TinyNet(seed=2)
    method = GradCAMPlusPlus(net, params(cam_scales=[1.0, 0.5], cam_flip=True))
    raw = method.maps(rand_x(1, 32, 28), torch.tensor([0, 1, 2, 3]))
    assert torch.isfinite(raw).all() and (raw >= 0).all()
    out = method(rand_image(32, 28), [0, 1, 2, 3])
    assert out.shape == (4, 32, 28) and out.dtype == np.float32
    assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    nonzero = out.reshape(4, -1).max(1) > 0
    assert nonzero.any()
    assert np.allclose(out.reshape(4, -1).max(1)[nonzero], 1.0, atol=1e-3)


def test_gradcampp_weights_by_hand():
    # one channel, g constant = w/(hw): alpha = g^2/(2g^2 + S g^3) with S = sum A (paper, Eq. 19)
    W = torch.tensor([[2.0]])
    A = torch.tensor([[[1.0, 3.0], [0.0, 4.0]]])[None]
    m = GradCAMPlusPlus(IdentityNet(W), params(gradcampp_alpha_norm=False)).maps(A, torch.tensor([0]))
    g = 2.0 / 4
    alpha = g**2 / (2 * g**2 + 8.0 * g**3)
    torch.testing.assert_close(m[0], alpha * 4 * g * A[0, 0])


def test_gradcampp_author_alpha_normalisation_by_hand():
    """The author's code divides the alphas by their spatial sum (misc/utils.py:117-119). Two
    channels, W = [2, 1], h w = 4: g = [0.5, 0.25], constant over positions, so each alpha map
    sums to 1 after normalisation and w_k = ReLU(g_k): M = 0.5 A_0 + 0.25 A_1. Without it
    (Eq. 19): w_k = 4 alpha_k g_k with alpha_k = 1 / (2 + g_k S_k): S = [8, 4] -> alpha = [1/6, 1/3]."""
    W = torch.tensor([[2.0, 1.0]])
    A = torch.tensor([[[1.0, 3.0], [0.0, 4.0]], [[2.0, 0.0], [1.0, 1.0]]])[None]
    m = GradCAMPlusPlus(IdentityNet(W), params()).maps(A, torch.tensor([0]))
    torch.testing.assert_close(m[0], 0.5 * A[0, 0] + 0.25 * A[0, 1])
    m = GradCAMPlusPlus(IdentityNet(W), params(gradcampp_alpha_norm=False)).maps(A, torch.tensor([0]))
    torch.testing.assert_close(m[0], 4 * (1 / 6) * 0.5 * A[0, 0] + 4 * (1 / 3) * 0.25 * A[0, 1])


# ---------------------------------------------------------------------- Score-CAM
@pytest.mark.parametrize("baseline", [True, False])
@pytest.mark.parametrize("score", ["sigmoid", "logit"])
@pytest.mark.parametrize("weights", ["softmax", "linear"])
def test_scorecam_fast_equals_reference(baseline, score, weights):
    net = with_constant_channel(TinyNet(seed=3), 2)
    x = rand_x(1, 20, 24)
    classes = torch.tensor([4, 0, 11])
    A = net.features(x)
    assert A[0, 2].max() == A[0, 2].min()  # the forced constant channel
    fast = ScoreCAM(net, params(), chunk=3, baseline=baseline, score=score, weights=weights).maps(x, classes)
    ref = ScoreCAMReference(net, params(), baseline=baseline, score=score, weights=weights).maps(x, classes)
    assert fast.shape == (3, *A.shape[-2:])
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)
    # the constant channel is skipped: weight 0
    S = scorecam_scores(net, x, A, classes, chunk=3, score=score)
    assert torch.isneginf(S[2]).all() and torch.isfinite(S[[0, 1, 3]]).all()


def test_scorecam_linear_weights_as_the_authors_loop():
    """``weights='linear'``: the loop of the authors' code (haofanwang/Score-CAM) written out
    here: for each non-constant channel, the class score of the image masked by its min-max
    normalised upsampled map, times the channel map, summed, ReLU (at feature resolution,
    where this module combines). With the baseline the score is the increase over the mean
    image, which does change linear maps (it cannot change softmax ones)."""
    net = with_constant_channel(TinyNet(seed=3), 2)
    x = rand_x(1, 20, 24)
    c = 4
    with torch.no_grad():
        A = net.features(x)[0]
        f0 = torch.sigmoid(net(torch.zeros_like(x))[0, c])
        plain, increase = torch.zeros_like(A[0]), torch.zeros_like(A[0])
        for k in range(A.shape[0]):
            if A[k].max() == A[k].min():
                continue
            up = F.interpolate(A[k][None, None], size=x.shape[-2:], mode="bilinear", align_corners=False)
            f = torch.sigmoid(net(x * (up - up.min()) / (up.max() - up.min()))[0, c])
            plain += f * A[k]
            increase += (f - f0) * A[k]
    got = ScoreCAM(net, params(), baseline=False, weights="linear").maps(x, torch.tensor([c]))[0]
    torch.testing.assert_close(got, F.relu(plain), rtol=1e-4, atol=1e-5)
    got_b = ScoreCAM(net, params(), baseline=True, weights="linear").maps(x, torch.tensor([c]))[0]
    torch.testing.assert_close(got_b, F.relu(increase), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, got_b, atol=1e-3)
    with pytest.raises(ValueError, match="weights"):
        ScoreCAM(net, params(), weights="sum")


def test_scorecam_one_pass_all_classes_chunked():
    net = with_constant_channel(TinyNet(channels=10, seed=4), 7)
    sizes = []
    handle = net.register_forward_pre_hook(lambda _m, inp: sizes.append(inp[0].shape[0]))
    try:
        ScoreCAM(net, params(), chunk=4, baseline=True).maps(rand_x(1, 16, 16), torch.tensor([1, 2, 3, 4, 5]))
    finally:
        handle.remove()
    # baseline forward (1) + ceil(9 non-constant channels / 4) chunked forwards, whatever n
    assert sizes == [1, 4, 4, 1]


def test_scorecam_all_constant_gives_zeros():
    net = TinyNet(seed=5)
    with torch.no_grad():
        net.conv2.weight.zero_()
        net.conv2.bias.fill_(-1.0)  # ReLU -> all channels 0
    x = rand_x(1, 16, 16)
    fast = ScoreCAM(net, params()).maps(x, torch.tensor([0, 1]))
    ref = ScoreCAMReference(net, params()).maps(x, torch.tensor([0, 1]))
    assert (fast == 0).all() and (ref == 0).all()


def test_scorecam_batch_equals_per_image_fast_path():
    net = with_constant_channel(TinyNet(seed=6, bn=True), 1)
    net.train()
    running = net.bn.running_mean.clone()
    x = rand_x(3, 24, 24, seed=1)
    labels = torch.zeros(3, K)
    labels[0, [0, 3]] = 1
    labels[1, [7]] = 1
    labels[2, [3, 9, 12]] = 1
    out = scorecam_batch(net, x, labels, chunk=3, baseline=True, score="sigmoid")
    assert net.training and torch.equal(net.bn.running_mean, running)  # mode restored, stats untouched
    assert out.shape == (3, K, 6, 6) and not out.requires_grad
    one = ScoreCAM(net, params(), chunk=5, baseline=True)  # puts net in eval mode
    for b in range(3):
        cls = labels[b].nonzero().flatten()
        torch.testing.assert_close(out[b, cls], one.maps(x[b:b + 1], cls), rtol=1e-5, atol=1e-6)
        absent = labels[b] == 0
        assert (out[b, absent] == 0).all()
    # batch-size and crop independence
    torch.testing.assert_close(scorecam_batch(net, x[1:], labels[1:], chunk=3), out[1:], rtol=1e-5, atol=1e-6)
    crop = x[:, :, 2:18, 4:24]
    small = scorecam_batch(net, crop, labels, chunk=64)
    assert small.shape == (3, K, 4, 5)
    torch.testing.assert_close(small[2, [3, 9, 12]], one.maps(crop[2:3], torch.tensor([3, 9, 12])),
                               rtol=1e-5, atol=1e-6)


def test_study_variant_uses_item0_scores():
    net = TinyNet(seed=7)
    x = rand_x(3, 20, 20, seed=2)
    labels = torch.ones(3, K)
    study = study_scorecam_batch(net, x, labels, chunk=4)
    correct = scorecam_batch(net, x, labels, chunk=4, baseline=False, score="logit")
    torch.testing.assert_close(study[0], correct[0], rtol=1e-5, atol=1e-6)
    for b in (1, 2):
        assert not torch.allclose(study[b], correct[b], rtol=1e-3, atol=1e-4)
    # items 1.. are their own activations weighted with item 0's weights
    A = net.features(x).detach()
    S0 = scorecam_scores(net, x[:1], A[:1], torch.arange(K), chunk=4, score="logit")
    w = torch.softmax(S0, 0)
    torch.testing.assert_close(study[2], F.relu(torch.einsum("kc,khw->chw", w, A[2])), rtol=1e-5, atol=1e-6)
    # absent classes are zeroed
    labels[1, 4] = 0
    assert (study_scorecam_batch(net, x, labels)[1, 4] == 0).all()


def test_study_variant_through_cams_batch():
    net = TinyNet(seed=8)
    imgs = [rand_image(20, 20, seed=s) for s in range(3)]
    classes = [[0, 1], [2], [3, 4]]
    study = ScoreCAM(net, params(cam_batch_size=8), variant="study")
    correct = ScoreCAM(net, params(), variant="correct", baseline=False, score="logit")
    batched = study.cams_batch(imgs, classes)
    np.testing.assert_allclose(batched[0], correct(imgs[0], classes[0]), atol=1e-5)
    assert not np.allclose(batched[1], correct(imgs[1], classes[1]), atol=1e-3)
    # one by one the study variant has no batch to leak from
    np.testing.assert_allclose(study(imgs[1], classes[1]), correct(imgs[1], classes[1]), atol=1e-5)


def test_scorecam_baseline_does_not_change_maps():
    # softmax over channels is invariant to the per-class baseline shift
    net = TinyNet(seed=9)
    x = rand_x(1, 16, 16)
    a = ScoreCAM(net, params(), baseline=True).maps(x, torch.tensor([0, 1]))
    b = ScoreCAM(net, params(), baseline=False).maps(x, torch.tensor([0, 1]))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- base: TTA
def test_multiscale_flip_shape_range_and_empty():
    net = TinyNet(seed=10)
    method = CAM(net, params(cam_scales=[1.0, 0.5, 1.5], cam_flip=True))
    img = rand_image(30, 44)
    out = method(img, [0, 5, 6])
    assert out.shape == (3, 30, 44) and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 1
    assert method(img, []).shape == (0, 30, 44)
    # batched calls equal single calls for ordinary methods
    outs = method.cams_batch([img, img[:, ::-1], rand_image(20, 20)], [[0, 5, 6], [1], []])
    np.testing.assert_allclose(outs[0], out, atol=1e-6)
    assert [o.shape for o in outs] == [(3, 30, 44), (1, 30, 44), (0, 20, 20)]


def test_flip_tta_makes_any_model_flip_equivariant():
    net = TinyNet(seed=11)
    method = CAM(net, params(cam_scales=[1.0, 0.5], cam_flip=True))
    img = rand_image(32, 36)
    a = method(img, [0, 2])
    b = method(np.ascontiguousarray(img[:, ::-1]), [0, 2])
    np.testing.assert_allclose(b, a[:, :, ::-1], atol=1e-5)


def test_symmetric_model_is_flip_equivariant_without_tta():
    net = TinyNet(seed=12, pool="avg")
    with torch.no_grad():
        for conv in (net.conv1, net.conv2):
            conv.weight.copy_((conv.weight + conv.weight.flip(-1)) / 2)
    method = CAM(net, params(cam_scales=[1.0, 0.5, 1.5], cam_flip=False))
    img = rand_image(32, 32, seed=3)
    a = method(img, [1, 3])
    b = method(np.ascontiguousarray(img[:, ::-1]), [1, 3])
    np.testing.assert_allclose(b, a[:, :, ::-1], atol=1e-5)


# ---------------------------------------------------------------------- registry
def test_registry_maps_names_to_methods():
    net = TinyNet()
    net.recam_predictor = nn.Conv2d(8, K, 1, bias=False)
    expect = {"cam": CAM, "gradcam": GradCAM, "gradcampp": GradCAMPlusPlus, "scorecam": ScoreCAM,
              "recam": ReCAM, "recam-scorecam": ReCAM, "puzzlecam": CAM}
    for name, cls in expect.items():
        m = get_method(name, net, Params())
        assert type(m) is cls and isinstance(m, CAMMethod)
    assert get_method(Method.RECAM_SCORECAM, net, Params()).reactivate
    assert not get_method("puzzlecam", net, Params()).reactivate
    assert {m.value for m in Method} == set(expect) | {"sipe"}


def test_registry_unknown_method_lists_choices():
    with pytest.raises(UserError) as e:
        get_method("lrp", TinyNet(), Params())
    msg = str(e.value)
    assert "lrp" in msg
    for m in Method:
        assert m.value in msg


def test_registry_missing_sipe_module_is_a_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "wsss.cams.sipe", None)  # import of it fails as if absent
    with pytest.raises(UserError, match="sipe"):
        get_method("sipe", TinyNet(), Params())
