"""The steps training and evaluation share: one training epoch, and predicting a stream of
batches into COCO results.

The training loop (its epochs and per-epoch evaluation) and `mrcnn-evaluate` call these.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist

from mrcnn.data.coco import CategoryMap
from mrcnn.data.transforms import to_model_inputs
from mrcnn.evaluation.coco_eval import evaluate_coco, to_coco_results
from mrcnn.masks import encode_masks
from mrcnn.segment import predict_images
from workflows.ingest import batch_to_model_inputs

LOSS_NAMES = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask")


@dataclass
class EpochStats:
    """One rank's epoch: its steps (made together with the other ranks), the images it trained
    on, its time waiting for data and computing, and the sums of the losses averaged over the
    ranks' batches."""

    steps: int = 0
    images: int = 0
    data_wait_s: float = 0.0
    compute_s: float = 0.0
    loss_sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(LOSS_NAMES, 0.0))

    def mean_losses(self) -> dict[str, float]:
        return {k: v / max(self.steps, 1) for k, v in self.loss_sums.items()}


@dataclass
class Progress:
    """How far training is on its schedule: the images every rank has trained on, counted in
    planned steps of `per_step` images (the global batch). With a dynamic split the ranks'
    shares of an epoch differ from step to step; the images are what the schedule plans for."""

    per_step: int
    images: int = 0

    @property
    def position(self) -> float:
        return self.images / self.per_step


def train_one_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    batches: Iterator[dict[str, Any]],
    device: torch.device,
    step: int,
    progress: Progress,
    max_steps: int = 0,
    grad_clip_norm: float | None = None,
    on_step: Callable[[int, dict[str, float], EpochStats], None] | None = None,
) -> tuple[int, EpochStats]:
    """Run `model` over `batches` (numpy batches from Ray Data) until every rank's batches end or
    the global `step` reaches `max_steps` (0: no limit). Returns (the new step, this rank's
    stats); `on_step(step, losses averaged over the ranks' batches, stats)` is called after every
    optimizer step, on every rank.

    Under DDP the ranks step together while any of them has a batch: a rank whose share of the
    epoch has ended steps on its last batch (a blank image before it had one) with its loss
    times zero. So every rank makes the same optimizer steps (same parameters, optimizer state
    and LR) and no image is dropped or seen twice, however unevenly a dynamic split deals the
    epoch. `progress` counts the images of all ranks."""
    stats = EpochStats()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    spare = None
    while not (max_steps and step >= max_steps):
        t0 = time.perf_counter()
        batch = next(batches, None)
        if batch is not None:
            images, targets = to_device(*batch_to_model_inputs(batch)[:2], device)
            spare = images, targets
        n = 0 if batch is None else len(images)
        total, ranks = all_ranks_sum([n, n > 0], world, device)
        if total == 0:
            break
        if batch is None:
            images, targets = spare or blank_input(device)
        t1 = time.perf_counter()
        losses = model(images, targets)  # in the model's precision (`set_precision`), the losses fp32
        loss = sum(losses.values())
        if n and not torch.isfinite(loss):
            raise FloatingPointError(
                f"loss is {loss.item()} at step {step} ({ {k: v.item() for k, v in losses.items()} }); "
                "lower trainer.optimizer.lr or set trainer.optimizer.grad_clip_norm")
        optimizer.zero_grad(set_to_none=True)
        # DDP averages gradients over all ranks: the mean over the ranks that had a batch.
        scaler.scale(loss * (world / ranks if n else 0.0)).backward()
        if grad_clip_norm:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, grad_clip_norm)
        scaler.step(optimizer)
        scaler.update()
        progress.images += total
        scheduler.step()
        step += 1
        values = all_ranks_mean({k: losses[k].detach() for k in LOSS_NAMES}, n > 0, world, device)
        stats.steps += 1
        stats.images += n
        stats.data_wait_s += t1 - t0
        stats.compute_s += time.perf_counter() - t1
        for k in LOSS_NAMES:
            stats.loss_sums[k] += values[k]
        if on_step is not None:
            on_step(step, values, stats)
    return step, stats


def all_ranks_sum(values: list[int], world: int, device: torch.device) -> list[int]:
    """`values` summed over the ranks (as they are with one)."""
    if world == 1:
        return [int(v) for v in values]
    t = torch.tensor([int(v) for v in values], dtype=torch.int64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_ranks_mean(losses: dict[str, torch.Tensor], counts: bool, world: int, device: torch.device) -> dict[str, float]:
    """Each loss averaged over the ranks where `counts` (those that trained on a batch)."""
    if world == 1:
        return {k: v.item() for k, v in losses.items()}
    t = torch.stack([*(v.float() * counts for v in losses.values()), torch.tensor(float(counts), device=device)])
    dist.all_reduce(t)
    return {k: (t[i] / t[-1]).item() for i, k in enumerate(losses)}


def to_device(images: list[torch.Tensor], targets: list[dict[str, Any]], device: torch.device):
    """Images and the targets' boxes and labels on `device` (RLE masks stay on the host)."""
    for t in targets:
        t["boxes"], t["labels"] = t["boxes"].to(device), t["labels"].to(device)
    return [im.to(device, non_blocking=True) for im in images], targets


def blank_input(device: torch.device) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """One 64 x 64 black image without objects: the input of a rank that has had no batch yet."""
    image, target = to_model_inputs(np.zeros((64, 64, 3), np.uint8), [])
    return to_device([image], [target], device)


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


def coco_results_of(
    model: torch.nn.Module, images: list[torch.Tensor], image_ids: list[int], labels: CategoryMap,
    device: torch.device | str,
) -> tuple[Predictions, list[dict[str, torch.Tensor]]]:
    """images: float[3, H, W] in [0, 1], predicted in one call -> their COCO results (RLE masks,
    the dataset's category ids) and the predictions themselves. Training's evaluation and the
    cluster's evaluation actors both make their results here."""
    out = Predictions()
    preds = predict_images(model, [im.to(device) for im in images])
    for image_id, p in zip(image_ids, preds):
        bbox, segm = to_coco_results(image_id, {**p, "rles": encode_masks(p["masks"])}, labels)
        out.bbox += bbox
        out.segm += segm
        out.image_ids.append(image_id)
    return out, preds


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
        results, preds = coco_results_of(model, images, ids, labels, device)
        out.extend(results)
        for image, target, image_id, p in zip(images, targets, ids, preds):
            if len(out.samples) < keep_images:
                out.samples.append((image_id, image, target, p))
    return out
