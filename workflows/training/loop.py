"""The per-worker training loop run by Ray Train's TorchTrainer.

    setup -> resume -> for each epoch: train_one_epoch, evaluate, log, checkpoint + report
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from mlflow.exceptions import MlflowException

from mrcnn import build_model
from mrcnn.checkpoint import load_weights_file, matching_tensors, save_checkpoint
from mrcnn.data.coco import CategoryMap
from mrcnn.evaluation.coco_eval import coco_ground_truth
from mrcnn.visualization import draw_side_by_side
from workflows.config import JobConfig, OptimizerConfig, as_dict
from workflows.logged_model import initial_weights
from workflows.runtime.allocator import reuse_large_blocks
from workflows.runtime.consoles import quiet_consoles
from workflows.runtime.ray_internals import checkpoint_destination
from workflows.storage import local_file, read_bytes, whole_file
from workflows.tracking import RunLogger, metric_key
from workflows.training.steps import EpochStats, Predictions, Progress, predict_to_coco, train_one_epoch
from workflows.training.trainer import TrainingRun


def say(line: str) -> None:
    """One line to the worker's stdout (streamed to the driver). Not print(): Ray Train patches
    print on its workers to log through the root logger as well, so every line came out twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def lr_factor(step: float, total: int, opt: OptimizerConfig) -> float:
    """Linear warmup from warmup_factor, then x gamma at each milestone (fractions of `total`).
    `step`: planned steps done (images trained on / the global batch)."""
    factor = 1.0
    if step < opt.warmup_steps:
        alpha = step / max(1, opt.warmup_steps)
        factor = opt.warmup_factor * (1 - alpha) + alpha
    passed = sum(1 for m in opt.milestones if step >= int(m * total))
    return factor * opt.gamma ** passed


def make_optimizer(model: torch.nn.Module, opt: OptimizerConfig, total_batch: int) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    lr = opt.lr * total_batch / opt.base_batch_size  # linear scaling rule
    # One fused kernel over all parameters instead of a few ops per parameter: AdamW's step
    # went from 43 to 18 ms for r18_fpn_small on 2 CPU cores (8 % of a training step).
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    if opt.name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=opt.weight_decay, fused=fused)
    return torch.optim.SGD(params, lr=lr, momentum=opt.momentum, weight_decay=opt.weight_decay, fused=fused)


@dataclass
class Worker:
    """What one training worker holds."""

    cfg: JobConfig
    run: TrainingRun
    labels: CategoryMap
    rank: int
    world: int
    device: torch.device
    model: torch.nn.Module  # DDP-wrapped when world > 1
    core: torch.nn.Module  # the model itself
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    total_steps: int  # planned: the schedule's length in steps of `total_batch` images
    total_batch: int
    progress: Progress  # where the schedule is: the images all ranks have trained on
    mlflow: RunLogger | None  # rank 0 only
    ground_truth: Any = None  # the val split's COCO ground truth, parsed at the first evaluation


def setup(cfg: JobConfig, run: TrainingRun) -> Worker:
    trainer = cfg.trainer
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if not cfg.verbose:  # pycocotools' tables, Ray Train's lines: to the worker's log files only
        quiet_consoles("")
    if trainer.torch_threads:
        torch.set_num_threads(trainer.torch_threads)
    reuse_large_blocks()
    torch.manual_seed(cfg.seed + rank)
    device = ray.train.torch.get_device()
    model = build_model(run.model).set_precision(trainer.precision)  # the per-epoch evaluation's too
    if run.init_weights:
        start_from(model, run.init_weights, run.tracking_uri, say_it=rank == 0)
    model = ray.train.torch.prepare_model(model)
    core = getattr(model, "module", model)
    total_batch = trainer.batch_size * world
    optimizer = make_optimizer(core, trainer.optimizer, total_batch)
    steps_per_epoch = max(1, math.ceil(run.num_train_images / total_batch))
    total_steps = steps_per_epoch * trainer.epochs
    if trainer.max_steps:
        total_steps = min(total_steps, trainer.max_steps)
    progress = Progress(total_batch)
    # Read at the images trained on, not at the optimizer steps: a dynamic split may deal a rank
    # more than its share of an epoch, and then every rank makes more steps of fewer images each.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda _: lr_factor(progress.position, total_steps, trainer.optimizer))
    # fp16's narrow range needs the loss scaled (bf16 has fp32's range and does not).
    scaler = torch.amp.GradScaler("cuda", enabled=trainer.precision == "fp16" and device.type == "cuda")
    logger = RunLogger(run.tracking_uri, run.run_id) if rank == 0 else None
    if rank == 0:
        say(f"{world} worker(s), {torch.get_num_threads()} torch threads each")
    return Worker(cfg, run, CategoryMap.from_dict(run.label_map), rank, world, device, model, core, optimizer,
                  scheduler, scaler, total_steps, total_batch, progress, logger)


def start_from(model: torch.nn.Module, uri: str, tracking_uri: str, say_it: bool) -> None:
    """Fine-tuning: the weights of `uri` (`trainer.init_weights`) whose names and shapes match;
    the rest (the predictors of another number of classes) keep their fresh initialisation."""
    state = initial_weights(uri, tracking_uri)
    matching = matching_tensors(model, state)
    model.load_state_dict(matching, strict=False)
    if say_it:
        fresh = sorted({k.rsplit(".", 1)[0] for k in model.state_dict() if k not in matching})
        say(f"started from {uri}: {len(matching)} of {len(model.state_dict())} tensors loaded; fresh: "
            + (", ".join(fresh) if fresh else "none"))


def resume(w: Worker, unrecorded: tuple[str, int] | None) -> tuple[int, int]:
    """(first epoch, global step) from the latest checkpoint: Ray Train's (a rerun of the same
    run name, or a restart after a worker failure), or `unrecorded` (file, step), the newest
    complete one in the run's folder, when it is further on (the driver died before Ray Train
    recorded it): only then is it read.
    (0, 0) for a fresh run."""
    payload = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            payload = load_weights_file(Path(d) / "checkpoint.pt")
    if unrecorded and (payload is None or unrecorded[1] > payload["step"]):
        with local_file(unrecorded[0], w.cfg.data.s3) as path:
            payload = load_weights_file(path)
        if w.rank == 0:
            say(f"{unrecorded[0]} is newer than any checkpoint Ray Train recorded (its driver stopped first)")
    if payload is None:
        return 0, 0
    w.core.load_state_dict(payload["model"])
    w.optimizer.load_state_dict(payload["optimizer"])
    w.scheduler.load_state_dict(payload["scheduler"])
    w.scaler.load_state_dict(payload["scaler"])
    w.progress.images = payload.get("images_trained", payload["step"] * w.total_batch)
    if w.rank == 0:
        say(f"resumed from epoch {payload['epoch']} (step {payload['step']})")
        # Every resume is in the run: a rerun of the run name, or Ray Train's restart after a failure.
        w.mlflow.set_tag("resumed_from", f"epoch {payload['epoch']} step {payload['step']}")
    return payload["epoch"] + 1, payload["step"]


def record_worker_nodes(w: Worker) -> None:
    node = ray.get_runtime_context().get_node_id()
    nodes = [node] * w.world
    if w.world > 1:
        dist.all_gather_object(nodes, node)
    if w.rank == 0:
        w.mlflow.set_tag("ray.worker_nodes", ",".join(nodes))


def last_logged_step(w: Worker, key: str) -> int:
    """The highest step of `key` already in the MLflow run (-1: none). After a restart from a
    checkpoint, the steps redone up to here were logged by the first attempt: they are not
    logged twice."""
    if w.rank != 0:
        return -1
    for attempt in range(3):  # the run logger's client fails fast; a busy server may take longer here
        try:
            history = w.mlflow.client.get_metric_history(w.run.run_id, metric_key(key))
            return max((m.step for m in history), default=-1)
        except MlflowException:
            if attempt == 2:
                raise
            time.sleep(5 * (attempt + 1))
    return -1


# The losses by short names in the step line: RPN objectness and box, classifier, box, mask.
SHORT = {"loss_objectness": "obj", "loss_rpn_box_reg": "rpn", "loss_classifier": "cls", "loss_box_reg": "box",
         "loss_mask": "mask"}


class StepLogger:
    """Rank 0: losses, lr, throughput and data wait every `log_every_steps` to MLflow and stdout."""

    def __init__(self, w: Worker, epoch: int, step: int, logged_until: int):
        self.w, self.epoch, self.logged_until = w, epoch, logged_until
        self.every = w.cfg.trainer.log_every_steps
        self.t0, self.images0 = time.time(), w.progress.images

    def __call__(self, step: int, losses: dict[str, float], stats: EpochStats) -> None:
        if self.w.rank != 0 or step % self.every:
            return
        images_per_s = (self.w.progress.images - self.images0) / max(time.time() - self.t0, 1e-6)
        metrics = dict(losses)
        wait_share = stats.data_wait_s / max(stats.data_wait_s + stats.compute_s, 1e-9)
        metrics.update(loss=sum(losses.values()), lr=self.w.optimizer.param_groups[0]["lr"],
                       images_per_s=images_per_s, data_wait_share=wait_share,
                       step_s=(stats.data_wait_s + stats.compute_s) / stats.steps)
        if step > self.logged_until:
            self.w.mlflow.log_metrics(metrics, step)
        planned, done = self.w.total_steps * self.w.total_batch, self.w.progress.images
        eta = (planned - done) / max(images_per_s, 1e-9)
        parts = " ".join(f"{SHORT[k]} {metrics[k]:.3f}" for k in SHORT)
        say(f"{time.strftime('%H:%M:%S')} epoch {self.epoch} step {step} ({100 * min(done / planned, 1):.0f}%) "
            f"loss {metrics['loss']:.3f} ({parts}) lr {metrics['lr']:.2e} {images_per_s:.1f} img/s "
            f"data wait {100 * wait_share:.0f}% ETA {max(eta, 0) / 60:.1f} min")


def evaluate(w: Worker, val_shard, epoch: int) -> dict[str, float]:
    """Predict this worker's val shard, gather the COCO results to rank 0 and run COCOeval
    there; rank 0 also logs prediction overlays. Other ranks return {}."""
    keep = w.cfg.tracking.log_images if w.rank == 0 else 0
    batches = val_shard.iter_batches(batch_size=w.cfg.trainer.batch_size, batch_format="numpy")
    preds = predict_to_coco(w.core, batches, w.labels, w.device, keep_images=keep)
    if w.world > 1:
        gathered = [None] * w.world if w.rank == 0 else None
        dist.gather_object((preds.bbox, preds.segm, preds.image_ids), gathered, dst=0)
        if w.rank != 0:
            return {}
        merged = Predictions(samples=preds.samples)
        for bbox, segm, ids in gathered:
            merged.extend(Predictions(bbox, segm, ids))
        preds = merged
    if w.ground_truth is None:
        w.ground_truth = coco_ground_truth(json.loads(read_bytes(w.run.val_annotations, w.cfg.data.s3)))
    metrics = preds.evaluate(w.ground_truth)
    say(f"epoch {epoch} eval on {len(set(preds.image_ids))} images: " +
          " ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k.endswith(("_AP", "AP50"))))
    for image_id, image, target, p in preds.samples:
        w.mlflow.log_image(draw_side_by_side(image, target, p, w.labels.names),
                           artifact_file=f"predictions/epoch_{epoch:03d}/{image_id}.png")
    return metrics


def images_skipped(w: Worker, seen: int, expected: int) -> int | None:
    """Training images of this epoch that never arrived (unreadable files are dropped, with a
    warning naming them, by the data pipeline): the records minus the images all workers saw.
    None when the epoch was cut short by max_steps."""
    total = torch.tensor([seen], dtype=torch.int64)
    if w.world > 1:
        dist.all_reduce(total)
    if w.cfg.trainer.max_steps and int(total) < expected:
        return None
    return expected - int(total)


def save_and_report(w: Worker, metrics: dict[str, float], epoch: int, step: int, save: bool) -> None:
    """Report this epoch's metrics to Ray Train, with a checkpoint from rank 0 when `save`. Rank 0
    writes it straight into the run's storage (bucket or folder) and Ray Train records it where it
    lies: nothing is staged on the node's disk, where a job stopped or a trial ended during a save
    would leave it."""
    if not (save and w.rank == 0):
        ray.train.report(metrics)
        return
    fs, folder, name = checkpoint_destination()
    with whole_file(fs, f"{folder}/checkpoint.pt") as f:
        save_checkpoint(f, w.core, optimizer=w.optimizer.state_dict(), scheduler=w.scheduler.state_dict(),
                        scaler=w.scaler.state_dict(), epoch=epoch, step=step, images_trained=w.progress.images,
                        label_map=w.labels.to_dict(), config=as_dict(w.cfg))
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint(folder, filesystem=fs), checkpoint_dir_name=name,
                     checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD)


def train_loop(cfg: JobConfig, run: TrainingRun) -> None:
    w = setup(cfg, run)
    trainer = cfg.trainer
    start_epoch, step = resume(w, run.resume_from)
    record_worker_nodes(w)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    max_steps = trainer.max_steps
    steps_logged, epochs_logged = last_logged_step(w, "loss"), last_logged_step(w, "epochs_completed")
    for epoch in range(start_epoch, trainer.epochs):
        if max_steps and step >= max_steps:
            break
        batches = iter(train_shard.iter_batches(batch_size=trainer.batch_size, batch_format="numpy",
                                                local_shuffle_buffer_size=4 * trainer.batch_size))
        step, stats = train_one_epoch(
            w.model, w.optimizer, w.scheduler, w.scaler, batches, w.device, step, w.progress, max_steps,
            grad_clip_norm=trainer.optimizer.grad_clip_norm,
            on_step=StepLogger(w, epoch, step, steps_logged))
        metrics: dict[str, float] = {"epoch": epoch, "epochs_completed": epoch + 1, "step": step}
        metrics.update({f"epoch_{k}": v for k, v in stats.mean_losses().items()})
        skipped = images_skipped(w, stats.images, run.num_train_images)
        if skipped is not None:
            metrics["images_skipped"] = skipped
        last = epoch == trainer.epochs - 1 or bool(max_steps and step >= max_steps)
        if (epoch + 1) % trainer.eval_every_epochs == 0 or last:
            metrics.update(evaluate(w, val_shard, epoch))
        if w.rank == 0 and step > epochs_logged:
            w.mlflow.log_metrics({k: v for k, v in metrics.items() if k not in ("epoch", "step")}, step)
        if w.rank == 0 and last:
            unsent = w.mlflow.close()
            if unsent:  # the driver names them at the end of the job
                metrics["mlflow_unlogged"] = unsent
        elif w.rank == 0:  # in MLflow before the report, after which Tune may stop this trial
            w.mlflow.flush()
        save_and_report(w, metrics, epoch, step,
                        save=(epoch + 1) % trainer.checkpoint_every_epochs == 0 or last)
