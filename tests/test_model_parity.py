"""Our Mask R-CNN against torchvision's, with the same weights and inputs."""

from __future__ import annotations

import pytest
import torch

from mrcnn.masks import encode_masks
from tests.helpers.oracle import make_pair

IMAGES = [(300, 400), (256, 200), (200, 500)]  # landscape, portrait, wide


def _images(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=g) for h, w in sizes]


def _match_ties(t, o):
    """`o` reordered to `t`'s order: detections whose scores tie (to float32 noise) may come out
    of the sort in either order; each is matched to the same-label one of (nearly) equal score
    with the best box overlap."""
    from torchvision.ops import box_iou

    iou = box_iou(t["boxes"], o["boxes"])
    same = (t["labels"][:, None] == o["labels"][None]) & ((t["scores"][:, None] - o["scores"][None]).abs() <= 1e-4)
    order, used = [], set()
    for i in range(len(t["boxes"])):
        cands = [j for j in torch.argsort(iou[i] * same[i], descending=True).tolist() if j not in used]
        order.append(cands[0])
        used.add(cands[0])
    return {k: v[order] for k, v in o.items()}


def _assert_same_detections(theirs, ours):
    total = 0
    for t, o in zip(theirs, ours):
        assert len(t["boxes"]) == len(o["boxes"])
        o = _match_ties(t, o)
        total += len(o["boxes"])
        assert torch.equal(t["labels"], o["labels"])
        torch.testing.assert_close(o["boxes"], t["boxes"], rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(o["scores"], t["scores"], rtol=0, atol=1e-4)
        assert o["masks"].dtype == torch.bool and o["masks"].shape[1:] == t["masks"].shape[2:]
        tm = t["masks"][:, 0] > 0.5
        inter = (tm & o["masks"]).flatten(1).sum(1).float()
        union = (tm | o["masks"]).flatten(1).sum(1).float()
        iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
        assert iou.min() >= 0.97, iou.min()
    assert total > 0, "degenerate test: no detections to compare"


@pytest.mark.parametrize("backbone,sizes", [
    ("resnet50", IMAGES),
    ("resnet18", IMAGES[:2]),
    ("resnet34", IMAGES[1:]),
])
def test_inference_matches_torchvision(backbone, sizes):
    tv, ours = make_pair(backbone)
    tv.eval()
    ours.eval()
    images = _images(sizes)
    with torch.no_grad():
        _assert_same_detections(tv(images), ours(images))


def _box_target(h, w, boxes, labels):
    boxes = torch.tensor(boxes, dtype=torch.float32)
    masks = torch.zeros(len(boxes), h, w, dtype=torch.uint8)
    for i, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
        masks[i, y1:y2, x1 + (x2 - x1) // 4: x2] = 1  # not the full box, so masks matter
    return {"boxes": boxes, "labels": torch.tensor(labels), "masks": masks}


def _targets():
    return [
        _box_target(300, 400, [[10, 20, 100, 150], [150, 100, 390, 290]], [1, 3]),
        _box_target(256, 200, [[5, 5, 60, 90]], [2]),
    ]


# The jobs' default, and plain NCHW (float64 ResNet-50 training steps: the second is in the slow set).
@pytest.mark.parametrize("channels_last", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_training_losses_and_gradients_match_torchvision(channels_last):
    # Sampling is made identical by seeding (ours draws random numbers in torchvision's order).
    # float64, so that the comparison sees the math and not float32 summation order (our CPU
    # RoIAlign backward is a sparse product, torchvision's a scatter loop). Measured: losses
    # within 2e-15 relative, gradients within 6e-15 of their largest value (1 and 2 threads, two
    # seeds, both memory formats), far inside the tolerances below.
    tv, ours = make_pair("resnet50", channels_last=channels_last)
    tv.double().train()
    ours.double().train()
    images = [im.double() for im in _images(IMAGES[:2])]
    targets = [dict(t, boxes=t["boxes"].double()) for t in _targets()]
    torch.manual_seed(1)
    theirs_losses = tv(images, targets)
    torch.manual_seed(1)
    our_losses = ours(images, [dict(t) for t in targets])
    assert set(our_losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier",
                               "loss_box_reg", "loss_mask"}
    for k, v in theirs_losses.items():
        torch.testing.assert_close(our_losses[k], v, rtol=1e-6, atol=0)
        assert v.item() > 0
    sum(theirs_losses.values()).backward()
    sum(our_losses.values()).backward()
    theirs_params, our_params = dict(tv.named_parameters()), dict(ours.named_parameters())
    for name in ["roi_heads.mask_predictor.mask_fcn_logits.weight", "roi_heads.box_head.fc6.weight",
                 "roi_heads.mask_predictor.conv5_mask.weight", "roi_heads.mask_predictor.conv5_mask.bias",
                 "rpn.head.conv.0.0.weight", "backbone.fpn.layer_blocks.0.0.weight",
                 "backbone.body.layer4.0.conv1.weight"]:
        g_t, g_o = theirs_params[name].grad, our_params[name].grad
        assert g_o is not None and g_t.abs().sum() > 0
        torch.testing.assert_close(g_o, g_t, rtol=1e-6, atol=1e-8)
    for name, p in our_params.items():  # the same parameters are frozen
        assert p.requires_grad == theirs_params[name].requires_grad, name


def test_rle_targets_give_the_same_losses_as_dense_masks():
    _, ours = make_pair("resnet18", channels_last=False)
    ours.train()
    images = _images(IMAGES[:2])
    dense = _targets()
    rle = [dict(t, masks=encode_masks(t["masks"])) for t in dense]
    torch.manual_seed(3)
    a = ours(images, dense)
    torch.manual_seed(3)
    b = ours(images, rle)
    for k in a:
        assert torch.equal(a[k], b[k]), k
