"""Public API, bad input, config validation and checkpoints of the model."""

from __future__ import annotations

import pytest
import torch

from mrcnn import MaskRCNN, ModelConfig, build_model
from mrcnn.checkpoint import checkpoint_step, load_checkpoint, load_torchvision_weights, save_checkpoint
from mrcnn.modeling.postprocess import paste_masks
from tests.helpers.models import small_config
from tests.helpers.oracle import make_pair


@pytest.fixture(scope="module")
def model() -> MaskRCNN:
    torch.manual_seed(0)
    return build_model(small_config())


def _target(n=1):
    boxes = torch.tensor([[10.0, 10, 50, 60]] * n)
    masks = torch.zeros(n, 100, 120, dtype=torch.uint8)
    masks[:, 10:60, 10:50] = 1
    return {"boxes": boxes, "labels": torch.ones(n, dtype=torch.int64), "masks": masks}


def test_eval_output_types_and_sizes(model):
    model.eval()
    images = [torch.rand(3, 100, 120), torch.rand(3, 77, 64)]
    with torch.no_grad():
        out = model(images)
    for det, im in zip(out, images):
        n = det["boxes"].shape[0]
        assert det["boxes"].dtype == torch.float32 and det["boxes"].shape == (n, 4)
        assert det["labels"].dtype == torch.int64 and det["labels"].shape == (n,)
        assert det["scores"].shape == (n,)
        assert det["masks"].dtype == torch.bool and det["masks"].shape == (n, *im.shape[1:])


@pytest.mark.parametrize("images,message", [
    ([torch.rand(100, 120)], r"images\[0\] must be float\[3, H, W\]"),
    ([torch.rand(1, 100, 120)], r"images\[0\] must be float\[3, H, W\]"),
    ([torch.randint(0, 255, (3, 100, 120), dtype=torch.uint8)], "dtype torch.uint8"),
    ([], "non-empty list"),
])
def test_bad_images_are_named(model, images, message):
    model.eval()
    with pytest.raises(ValueError, match=message):
        model(images)


def test_training_target_errors(model):
    model.train()
    image = [torch.rand(3, 100, 120)]
    with pytest.raises(ValueError, match="needs targets"):
        model(image)
    bad = _target()
    bad["boxes"] = torch.tensor([[10.0, 10, 10, 60]])
    with pytest.raises(ValueError, match=r"targets\[0\]\['boxes'\]\[0\].*positive width"):
        model(image, [bad])
    bad = _target()
    bad["labels"] = torch.tensor([7])
    with pytest.raises(ValueError, match=r"labels'\] must be in 1..2"):
        model(image, [bad])
    bad = _target()
    del bad["masks"]
    with pytest.raises(ValueError, match="has no 'masks'"):
        model(image, [bad])


def test_empty_targets_are_legal(model):
    model.train()
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
             "masks": torch.zeros(0, 100, 120, dtype=torch.uint8)}
    losses = model([torch.rand(3, 100, 120), torch.rand(3, 100, 120)], [empty, _target()])
    assert all(torch.isfinite(v) for v in losses.values())
    losses = model([torch.rand(3, 100, 120)], [empty])
    assert losses["loss_mask"].item() == 0 and losses["loss_box_reg"].item() == 0
    sum(losses.values()).backward()


def test_config_validation_names_the_key():
    cfg = ModelConfig()
    cfg.backbone.name = "vgg16"
    cfg.anchors.sizes = [[32], [64]]
    cfg.roi_heads.detections_per_img = -1
    with pytest.raises(ValueError) as e:
        build_model(cfg)
    msg = str(e.value)
    assert "model.backbone.name='vgg16'" in msg
    assert "model.anchors.sizes has 2 levels" in msg
    assert "model.roi_heads.detections_per_img=-1" in msg
    with pytest.raises(ValueError, match="unknown key.*bogus"):
        ModelConfig.from_dict({"rpn": {"bogus": 1}})


def test_checkpoint_roundtrip(tmp_path, model):
    save_checkpoint(tmp_path / "ck.pt", model, step=7, label_map={"1": 3})
    loaded, payload = load_checkpoint(tmp_path / "ck.pt")
    assert payload["step"] == 7 and payload["label_map"] == {"1": 3}
    model.eval()
    loaded.eval()
    image = [torch.rand(3, 96, 96)]
    with torch.no_grad():
        a, b = model(image)[0], loaded(image)[0]
    assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["masks"], b["masks"])
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")
    # What resume trusts: a complete file gives its step; a copy cut short, none.
    data = (tmp_path / "ck.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    assert checkpoint_step(tmp_path / "ck.pt") == 7
    assert checkpoint_step(tmp_path / "cut.pt") is None and checkpoint_step(tmp_path / "missing.pt") is None


def test_torchvision_file_with_legacy_keys_and_coco_eps(tmp_path):
    tv, ours = make_pair("resnet18")
    state = tv.state_dict()
    legacy = {}
    for k, v in state.items():  # torchvision < 0.13 names
        k = k.replace("fpn.inner_blocks.0.0.", "fpn.inner_blocks.0.").replace("rpn.head.conv.0.0.", "rpn.head.conv.")
        k = k.replace("mask_head.0.0.", "mask_head.mask_fcn1.").replace("mask_head.3.0.", "mask_head.mask_fcn4.")
        legacy[k] = v
    assert "rpn.head.conv.weight" in legacy and "roi_heads.mask_head.mask_fcn4.weight" in legacy
    torch.save(legacy, tmp_path / "legacy.pth")
    fresh = build_model(ours.cfg)
    load_torchvision_weights(fresh, tmp_path / "legacy.pth", frozen_bn_eps=0.0)
    for (k, a), b in zip(ours.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k
    assert fresh.backbone.body.bn1.eps == 0.0 and fresh.cfg.backbone.norm_eps == 0.0
    with pytest.raises(FileNotFoundError):
        load_torchvision_weights(fresh, tmp_path / "nope.pth")


def test_paste_masks_equals_torchvision_paste():
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    g = torch.Generator().manual_seed(0)
    probs = torch.rand(40, 28, 28, generator=g)
    xy = torch.rand(40, 2, generator=g) * torch.tensor([90.0, 60])
    wh = torch.rand(40, 2, generator=g) * 60 + 0.5
    boxes = torch.cat([xy, xy + wh], dim=1)  # some run past the image edge
    ours = paste_masks(probs, boxes, (64, 100))
    theirs = paste_masks_in_image(probs[:, None], boxes, (64, 100))[:, 0] > 0.5
    assert ours.shape == (40, 64, 100)
    assert torch.equal(ours, theirs)
    assert paste_masks(torch.zeros(0, 28, 28), torch.zeros(0, 4), (5, 5)).shape == (0, 5, 5)


def test_sparse_roi_align_equals_torchvision_forward_and_backward():
    from torchvision.ops import MultiScaleRoIAlign as TVMultiScaleRoIAlign

    from mrcnn.modeling.roi_align import MultiScaleRoIAlign

    g = torch.Generator().manual_seed(0)
    sizes = [(2, 64, 48), (2, 32, 24), (2, 16, 12), (2, 8, 6)]  # strides 4..32 of a 256x192 batch
    feats = {str(i): torch.randn(b, 8, h, w, generator=g, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last).requires_grad_() for i, (b, h, w) in enumerate(sizes)}
    boxes = []
    for _ in range(2):  # small to large boxes (every level), some past the border
        xy = torch.rand(60, 2, generator=g, dtype=torch.float64) * torch.tensor([200.0, 250])
        wh = torch.rand(60, 2, generator=g, dtype=torch.float64) ** 3 * 600 + 0.3
        boxes.append(torch.cat([xy, xy + wh], 1))
    image_sizes = [(256, 192), (240, 180)]
    names = list(feats)
    ours = MultiScaleRoIAlign(names, 7, 2)(feats, boxes, image_sizes)
    theirs = TVMultiScaleRoIAlign(names, 7, 2)(feats, boxes, image_sizes)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    grad = torch.randn(ours.shape, generator=g, dtype=torch.float64)
    ours_grads = torch.autograd.grad(ours, list(feats.values()), grad)
    theirs_grads = torch.autograd.grad(theirs, list(feats.values()), grad)
    for a, b in zip(ours_grads, theirs_grads):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    empty = MultiScaleRoIAlign(names, 7, 2)(feats, [torch.zeros(0, 4, dtype=torch.float64)] * 2, image_sizes)
    assert empty.shape == (0, 8, 7, 7)


@pytest.mark.parametrize("frozen_bn", [True, False])
def test_norm_folded_into_convolutions_equals_the_resnet_forward(frozen_bn):
    from torchvision.ops import FrozenBatchNorm2d

    from mrcnn.config import BackboneConfig
    from mrcnn.modeling.backbone import build_backbone

    torch.manual_seed(0)
    backbone = build_backbone(BackboneConfig(name="resnet50", frozen_bn=frozen_bn, trainable_layers=3,
                                             fpn_channels=32)).double()
    with torch.no_grad():  # statistics and affine terms far from the identity
        for m in backbone.modules():
            if isinstance(m, (FrozenBatchNorm2d, torch.nn.BatchNorm2d)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    backbone.eval()  # BatchNorm2d folds only with running statistics; FrozenBatchNorm2d always
    x = torch.rand(2, 3, 96, 64, dtype=torch.float64)
    ours = backbone.body(x)
    body, h = backbone.body, x
    h = body["maxpool"](torch.relu(body["bn1"](body["conv1"](h))))
    # Tolerances relative to each tensor's largest value: float64 rounding of the two orders of
    # operations measured at most 5e-15 of it forward and 1e-15 for the gradient (1 and 2
    # threads, 3 seeds, channels-last on and off); an unfolded or misfolded norm is off by 1e-2.
    for i, stage in enumerate(("layer1", "layer2", "layer3", "layer4")):
        h = body[stage](h)  # torchvision's own block forward: conv, norm, ReLU, unfolded
        torch.testing.assert_close(ours[str(i)], h, rtol=0, atol=1e-12 * h.abs().max().item())
    weight = body["layer3"][0].conv2.weight  # a trainable weight: the fold passes its gradient
    grad_ours, = torch.autograd.grad(ours["3"].sum(), weight)
    grad_ref, = torch.autograd.grad(h.sum(), weight)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=0, atol=1e-12 * grad_ref.abs().max().item())


def test_stage_memory_format_follows_the_map_size():
    """NHWC stages where the maps are larger than 8 x 8, NCHW (weights too) on smaller ones: the
    same features as one format throughout."""
    from mrcnn.config import BackboneConfig
    from mrcnn.modeling.backbone import build_backbone

    nhwc, nchw = torch.channels_last, torch.contiguous_format
    torch.manual_seed(0)
    small = build_backbone(BackboneConfig(name="resnet18", fpn_channels=32), max_input_side=128)
    large = build_backbone(BackboneConfig(name="resnet18", fpn_channels=32), max_input_side=512)
    plain = build_backbone(BackboneConfig(name="resnet18", fpn_channels=32, channels_last=False),
                           max_input_side=128)
    stages = ("layer1", "layer2", "layer3", "layer4")
    assert [small.body.formats[s] for s in stages] == [nhwc, nhwc, nchw, nchw]  # maps 32, 16, 8, 4
    assert [large.body.formats[s] for s in stages] == [nhwc] * 4
    assert [plain.body.formats[s] for s in stages] == [nchw] * 4
    assert small.body["layer4"][1].conv2.weight.is_contiguous()
    assert not small.body["layer2"][1].conv2.weight.is_contiguous()
    large.load_state_dict(small.state_dict())
    plain.load_state_dict(small.state_dict())
    x = torch.rand(2, 3, 128, 96)
    outs = [m(x) for m in (small, large, plain)]
    with torch.no_grad():
        assert small.body(x)["3"].is_contiguous() and large.body(x)["3"].is_contiguous(memory_format=nhwc)
    for other in outs[1:]:
        for k, v in outs[0].items():
            torch.testing.assert_close(v, other[k], rtol=1e-4, atol=1e-5)
