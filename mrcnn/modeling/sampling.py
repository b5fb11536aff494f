"""Matching anchors / proposals to ground truth, and balanced sampling of training examples."""

from __future__ import annotations

import torch
from torch import Tensor


class Matcher:
    """Assigns each prediction (column) the ground-truth box (row) it overlaps most.

    Returns int64[P]: the matched gt index, or BELOW_LOW_THRESHOLD (background) /
    BETWEEN_THRESHOLDS (ignored). With `allow_low_quality_matches`, every gt box also claims
    the predictions it overlaps best, even under the high threshold (the RPN's rule).
    """

    BELOW_LOW_THRESHOLD = -1
    BETWEEN_THRESHOLDS = -2

    def __init__(
        self, high_threshold: float, low_threshold: float, allow_low_quality_matches: bool = False
    ) -> None:
        if low_threshold > high_threshold:
            raise ValueError("low_threshold must be <= high_threshold")
        self.high_threshold = high_threshold
        self.low_threshold = low_threshold
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, match_quality: Tensor) -> Tensor:
        """match_quality: float[G, P] IoU of G gt boxes (G >= 1) with P predictions."""
        matched_vals, matches = match_quality.max(dim=0)
        all_matches = matches.clone() if self.allow_low_quality_matches else None
        matches[matched_vals < self.low_threshold] = self.BELOW_LOW_THRESHOLD
        between = (matched_vals >= self.low_threshold) & (matched_vals < self.high_threshold)
        matches[between] = self.BETWEEN_THRESHOLDS
        if all_matches is not None:
            best_per_gt = match_quality.max(dim=1).values
            # Ties count: every prediction that reaches a gt's best IoU keeps its match.
            preds = torch.where(match_quality == best_per_gt[:, None])[1]
            matches[preds] = all_matches[preds]
        return matches


class BalancedPositiveNegativeSampler:
    """Samples at most `batch_size_per_image` examples, `positive_fraction` of them positive.

    Random choice goes through `torch.randperm`, one call for positives then one for
    negatives per image, so a seeded run samples the same examples as torchvision.
    """

    def __init__(self, batch_size_per_image: int, positive_fraction: float) -> None:
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction

    def __call__(self, labels: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """labels: per image int/float[P]: >= 1 positive, 0 negative, -1 ignored.

        Returns per image bool[P] masks of sampled positives and sampled negatives.
        """
        pos_masks, neg_masks = [], []
        for labels_per_image in labels:
            positive = torch.where(labels_per_image >= 1)[0]
            negative = torch.where(labels_per_image == 0)[0]
            num_pos = min(positive.numel(), int(self.batch_size_per_image * self.positive_fraction))
            num_neg = min(negative.numel(), self.batch_size_per_image - num_pos)
            pos = positive[torch.randperm(positive.numel(), device=positive.device)[:num_pos]]
            neg = negative[torch.randperm(negative.numel(), device=negative.device)[:num_neg]]
            pos_mask = torch.zeros_like(labels_per_image, dtype=torch.bool)
            neg_mask = torch.zeros_like(labels_per_image, dtype=torch.bool)
            pos_mask[pos] = True
            neg_mask[neg] = True
            pos_masks.append(pos_mask)
            neg_masks.append(neg_mask)
        return pos_masks, neg_masks
