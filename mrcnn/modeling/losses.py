"""The multi-task loss: RPN objectness + box, Fast R-CNN class + box, per-class mask BCE."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align


def rpn_loss(
    objectness: Tensor, deltas: Tensor, labels: Tensor, regression_targets: Tensor,
    sampled_pos: Tensor, sampled_neg: Tensor,
) -> tuple[Tensor, Tensor]:
    """objectness: float[A_total] logits over all anchors of the batch; deltas: float[A_total, 4];
    labels: float[A_total] (1 object, 0 background, -1 ignored); regression_targets:
    float[A_total, 4]; sampled_pos / sampled_neg: bool[A_total].

    Returns (loss_objectness, loss_rpn_box_reg); the box loss is normalised by the number of
    sampled anchors, as in Detectron.
    """
    pos = torch.where(sampled_pos)[0]
    sampled = torch.cat([pos, torch.where(sampled_neg)[0]])
    box_loss = F.smooth_l1_loss(
        deltas[pos], regression_targets[pos], beta=1 / 9, reduction="sum"
    ) / sampled.numel()
    obj_loss = F.binary_cross_entropy_with_logits(objectness[sampled], labels[sampled])
    return obj_loss, box_loss


def fastrcnn_loss(
    class_logits: Tensor, box_regression: Tensor, labels: Tensor, regression_targets: Tensor
) -> tuple[Tensor, Tensor]:
    """class_logits: float[R, K+1]; box_regression: float[R, 4(K+1)]; labels: int64[R];
    regression_targets: float[R, 4] for the sampled RoIs of the whole batch.

    Returns (loss_classifier, loss_box_reg); the box loss uses the gt class's deltas only.
    """
    classification_loss = F.cross_entropy(class_logits, labels)
    pos = torch.where(labels > 0)[0]
    box_regression = box_regression.reshape(class_logits.shape[0], -1, 4)
    box_loss = F.smooth_l1_loss(
        box_regression[pos, labels[pos]], regression_targets[pos], beta=1 / 9, reduction="sum"
    ) / labels.numel()
    return classification_loss, box_loss


def project_masks_on_boxes(gt_masks: Tensor, boxes: Tensor, matched_idxs: Tensor, size: int) -> Tensor:
    """gt_masks: uint8[G, H, W] at the network input scale; boxes: float[P, 4] positive RoIs;
    matched_idxs: int64[P] gt index per RoI. Returns float[P, size, size] mask targets in [0, 1].
    """
    rois = torch.cat([matched_idxs.to(boxes)[:, None], boxes], dim=1)
    return roi_align(gt_masks[:, None].to(rois), rois, (size, size), 1.0)[:, 0]


def maskrcnn_loss(
    mask_logits: Tensor, proposals: list[Tensor], gt_masks: list[Tensor],
    gt_labels: list[Tensor], matched_idxs: list[Tensor],
) -> Tensor:
    """mask_logits: float[P, K+1, M, M] for the positive RoIs of the batch; per image:
    proposals float[P_i, 4], gt_masks uint8[G_i, H, W], gt_labels int64[G_i], matched_idxs
    int64[P_i]. Returns the mean per-pixel BCE of the gt class's mask (the paper's L_mask).
    """
    size = mask_logits.shape[-1]
    labels = torch.cat([lab[idx] for lab, idx in zip(gt_labels, matched_idxs)])
    targets = torch.cat([
        project_masks_on_boxes(m, p, i, size) for m, p, i in zip(gt_masks, proposals, matched_idxs)
    ])
    if targets.numel() == 0:
        return mask_logits.sum() * 0
    picked = mask_logits[torch.arange(labels.shape[0], device=labels.device), labels]
    return F.binary_cross_entropy_with_logits(picked, targets)
