"""The shared engine: one training epoch, and predicting a stream of batches into COCO results.

The training loop (per-epoch evaluation), `mrcnn-evaluate` and the sweeps all call these.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch

from mrcnn.data.coco import CategoryMap
from mrcnn.evaluation.coco_eval import evaluate_coco, to_coco_results
from mrcnn.masks import encode_masks
from mrcnn.segment import predict_images
from workflows.ingest import batch_to_model_inputs

LOSS_NAMES = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask")


@dataclass
class EpochStats:
    steps: int = 0
    images: int = 0
    data_wait_s: float = 0.0
    compute_s: float = 0.0
    loss_sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(LOSS_NAMES, 0.0))

    def mean_losses(self) -> dict[str, float]:
        return {k: v / max(self.steps, 1) for k, v in self.loss_sums.items()}


def train_one_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    batches: Iterator[dict[str, Any]],
    device: torch.device,
    step: int,
    max_steps: int = 0,
    amp: bool = False,
    grad_clip_norm: float | None = None,
    on_step: Callable[[int, dict[str, torch.Tensor], EpochStats], None] | None = None,
) -> tuple[int, EpochStats]:
    """Run `model` over `batches` (numpy batches from Ray Data) until they end or the global
    `step` reaches `max_steps` (0: no limit). Returns (the new step, this epoch's stats);
    `on_step(step, losses, stats)` is called after every optimizer step."""
    stats = EpochStats()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    while not (max_steps and step >= max_steps):
        t0 = time.perf_counter()
        batch = next(batches, None)
        if batch is None:
            break
        images, targets, _ = batch_to_model_inputs(batch)
        images = [im.to(device, non_blocking=True) for im in images]
        for t in targets:
            t["boxes"], t["labels"] = t["boxes"].to(device), t["labels"].to(device)
        t1 = time.perf_counter()
        with torch.autocast(device.type, enabled=amp):
            losses = model(images, targets)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"loss is {loss.item()} at step {step} ({ {k: v.item() for k, v in losses.items()} }); "
                "lower trainer.optimizer.lr or set trainer.optimizer.grad_clip_norm")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if grad_clip_norm:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, grad_clip_norm)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        step += 1
        stats.steps += 1
        stats.images += len(images)
        stats.data_wait_s += t1 - t0
        stats.compute_s += time.perf_counter() - t1
        for k in LOSS_NAMES:
            stats.loss_sums[k] += losses[k].item()
        if on_step is not None:
            on_step(step, losses, stats)
    return step, stats


@dataclass
class Predictions:
    """COCO results of a stream of images, and the first few pictures for overlays."""

    bbox: list[dict] = field(default_factory=list)
    segm: list[dict] = field(default_factory=list)
    image_ids: list[int] = field(default_factory=list)
    # (image_id, float[3, H, W] image, target with RLE masks, prediction with dense masks) for
    # the first `keep_images`
    samples: list[tuple[int, torch.Tensor, dict, dict]] = field(default_factory=list)

    def extend(self, other: Predictions) -> None:
        self.bbox += other.bbox
        self.segm += other.segm
        self.image_ids += other.image_ids
        self.samples += other.samples

    def evaluate(self, ground_truth) -> dict[str, float]:
        """COCOeval bbox + segm on the predicted images -> flat {bbox_AP, segm_AP50, ...}."""
        metrics = evaluate_coco(ground_truth, {"bbox": self.bbox, "segm": self.segm},
                                image_ids=sorted(set(self.image_ids)))
        return {f"{t}_{m}": v for t, ms in metrics.items() for m, v in ms.items()}


def set_detection_limits(model: torch.nn.Module, score_threshold: float, max_detections: int) -> torch.nn.Module:
    """Detections kept at inference: score above `score_threshold`, at most `max_detections`
    per image (masks are computed only for those)."""
    model.cfg.roi_heads.score_thresh = score_threshold
    model.cfg.roi_heads.detections_per_img = max_detections
    return model


def predict_to_coco(
    model: torch.nn.Module,
    batches: Iterable[dict[str, Any]],
    labels: CategoryMap,
    device: torch.device,
    keep_images: int = 0,
) -> Predictions:
    """Predict every image of `batches` (numpy batches of the val dataset) into COCO results
    with RLE masks, labels mapped back to the dataset's category ids."""
    out = Predictions()
    for batch in batches:
        images, targets, ids = batch_to_model_inputs(batch)
        preds = predict_images(model, [im.to(device) for im in images])
        for image, target, image_id, p in zip(images, targets, ids, preds):
            bbox, segm = to_coco_results(image_id, {**p, "rles": encode_masks(p["masks"])}, labels)
            out.bbox += bbox
            out.segm += segm
            out.image_ids.append(image_id)
            if len(out.samples) < keep_images:
                out.samples.append((image_id, image, target, p))
    return out


def no_sync_join(model: torch.nn.Module):
    """DDP's join() for uneven shard ends (each image once, no hang); a no-op without DDP."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.join()
    return contextlib.nullcontext()
