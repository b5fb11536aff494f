"""The per-worker training loop run by Ray Train's TorchTrainer."""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from mlflow.tracking import MlflowClient

from mrcnn import build_model
from mrcnn.checkpoint import load_torchvision_weights, save_checkpoint
from mrcnn.data.coco import CategoryMap
from mrcnn.evaluation.coco_eval import coco_ground_truth, evaluate_coco, to_coco_results
from mrcnn.masks import encode_masks
from mrcnn.visualization import draw_predictions
from workflows.data import batch_to_model_inputs
from workflows.storage import read_bytes
from workflows.tracking import log_metrics

LOSS_NAMES = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask")


def lr_factor(step: int, total: int, opt: dict[str, Any]) -> float:
    """Linear warmup from warmup_factor, then x gamma at each milestone (fractions of `total`)."""
    factor = 1.0
    if step < opt["warmup_steps"]:
        alpha = step / max(1, opt["warmup_steps"])
        factor = opt["warmup_factor"] * (1 - alpha) + alpha
    passed = sum(1 for m in opt["milestones"] if step >= int(m * total))
    return factor * opt["gamma"] ** passed


def make_optimizer(model: torch.nn.Module, opt: dict[str, Any], total_batch: int) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    lr = opt["lr"] * total_batch / opt["base_batch_size"]  # linear scaling rule
    if opt["name"] == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=opt["weight_decay"])
    return torch.optim.SGD(params, lr=lr, momentum=opt["momentum"], weight_decay=opt["weight_decay"])


def _to_device(images, targets, device):
    images = [im.to(device, non_blocking=True) for im in images]
    for t in targets:
        t["boxes"] = t["boxes"].to(device)
        t["labels"] = t["labels"].to(device)
    return images, targets


def train_loop(config: dict[str, Any]) -> None:
    cfg, label_map = config["cfg"], CategoryMap.from_dict(config["label_map"])
    trainer_cfg, opt_cfg = cfg["trainer"], cfg["trainer"]["optimizer"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if trainer_cfg["torch_threads"]:
        torch.set_num_threads(trainer_cfg["torch_threads"])
    torch.manual_seed(cfg["seed"] + rank)
    if rank == 0:
        print(f"{world} worker(s), {torch.get_num_threads()} torch threads each", flush=True)
    device = ray.train.torch.get_device()
    use_amp = trainer_cfg["amp"] and device.type == "cuda"

    model = build_model(cfg["model"])
    if trainer_cfg["init_weights"]:
        load_torchvision_weights(model, trainer_cfg["init_weights"], strict=False)
    model = ray.train.torch.prepare_model(model)
    core = getattr(model, "module", model)
    total_batch = trainer_cfg["batch_size"] * world
    optimizer = make_optimizer(core, opt_cfg, total_batch)
    steps_per_epoch = max(1, math.ceil(config["num_train_images"] / total_batch))
    total_steps = steps_per_epoch * trainer_cfg["epochs"]
    if trainer_cfg["max_steps"]:
        total_steps = min(total_steps, trainer_cfg["max_steps"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, opt_cfg))
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    start_epoch, step = 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # resume: a rerun of the same run name, or a restart after a worker failure
        with checkpoint.as_directory() as d:
            payload = torch.load(Path(d) / "checkpoint.pt", map_location="cpu", weights_only=True)
        core.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        scaler.load_state_dict(payload["scaler"])
        start_epoch, step = payload["epoch"] + 1, payload["step"]
        if rank == 0:
            print(f"resumed from epoch {payload['epoch']} (step {step})", flush=True)

    client = MlflowClient(config["tracking_uri"]) if rank == 0 else None
    run_id = config["run_id"]
    node = ray.get_runtime_context().get_node_id()
    nodes = [node] * world
    if world > 1:
        dist.all_gather_object(nodes, node)
    if rank == 0:
        client.set_tag(run_id, "ray.worker_nodes", ",".join(nodes))
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    t_start, steps_at_start = time.time(), step

    for epoch in range(start_epoch, trainer_cfg["epochs"]):
        if trainer_cfg["max_steps"] and step >= trainer_cfg["max_steps"]:
            break
        model.train()
        sums = dict.fromkeys(LOSS_NAMES, 0.0)
        n_steps, n_images, data_wait = 0, 0, 0.0
        join = model.join() if isinstance(model, torch.nn.parallel.DistributedDataParallel) \
            else contextlib.nullcontext()  # uneven shard ends: each image once, no DDP hang
        with join:
            it = iter(train_shard.iter_batches(batch_size=trainer_cfg["batch_size"], batch_format="numpy",
                                               local_shuffle_buffer_size=4 * trainer_cfg["batch_size"]))
            while True:
                if trainer_cfg["max_steps"] and step >= trainer_cfg["max_steps"]:
                    break
                t0 = time.time()
                batch = next(it, None)
                if batch is None:
                    break
                images, targets, _ = batch_to_model_inputs(batch)
                images, targets = _to_device(images, targets, device)
                t1 = time.time()
                data_wait += t1 - t0
                with torch.autocast(device.type, enabled=use_amp):
                    losses = model(images, targets)
                loss = sum(losses.values())
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"loss is {loss.item()} at step {step} ({ {k: v.item() for k, v in losses.items()} }); "
                        "lower trainer.optimizer.lr or set trainer.optimizer.grad_clip_norm")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if opt_cfg["grad_clip_norm"]:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(core.parameters(), opt_cfg["grad_clip_norm"])
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                step += 1
                n_steps += 1
                n_images += len(images)
                for k in LOSS_NAMES:
                    sums[k] += losses[k].item()
                if rank == 0 and step % trainer_cfg["log_every_steps"] == 0:
                    elapsed = time.time() - t_start
                    rate = (step - steps_at_start) / max(elapsed, 1e-6)
                    ips = rate * total_batch
                    eta = (total_steps - step) / max(rate, 1e-9)
                    metrics = {k: v.item() for k, v in losses.items()}
                    metrics.update(loss=loss.item(), lr=optimizer.param_groups[0]["lr"], images_per_s=ips,
                                   data_wait_s=data_wait / max(n_steps, 1))
                    log_metrics(client, run_id, metrics, step)
                    print(f"{time.strftime('%H:%M:%S')} epoch {epoch} step {step}/{total_steps} loss {loss.item():.3f} "
                          f"lr {metrics['lr']:.2e} {ips:.1f} img/s data wait {metrics['data_wait_s']:.2f}s "
                          f"ETA {eta / 60:.1f} min", flush=True)

        metrics: dict[str, float] = {"epoch": epoch, "step": step}
        metrics.update({f"epoch_{k}": v / max(n_steps, 1) for k, v in sums.items()})
        last = epoch == trainer_cfg["epochs"] - 1 or (trainer_cfg["max_steps"] and step >= trainer_cfg["max_steps"])
        if (epoch + 1) % trainer_cfg["eval_every_epochs"] == 0 or last:
            metrics.update(evaluate_shard(model, core, val_shard, config, device, rank, world, client, epoch))
        if rank == 0:
            log_metrics(client, run_id, {k: v for k, v in metrics.items() if k not in ("epoch", "step")}, step)
        save = (epoch + 1) % trainer_cfg["checkpoint_every_epochs"] == 0 or last
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if save and rank == 0:
                save_checkpoint(Path(tmp) / "checkpoint.pt", core, optimizer=optimizer.state_dict(),
                                scheduler=scheduler.state_dict(), scaler=scaler.state_dict(), epoch=epoch,
                                step=step, label_map=label_map.to_dict(), config=cfg)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)


@torch.no_grad()
def evaluate_shard(model, core, val_shard, config, device, rank, world, client, epoch) -> dict[str, float]:
    """Predict on this worker's val shard, gather COCO results to rank 0, run COCOeval there."""
    cfg = config["cfg"]
    label_map = CategoryMap.from_dict(config["label_map"])
    core.eval()
    results = {"bbox": [], "segm": []}
    image_ids: list[int] = []
    overlays = []
    for batch in val_shard.iter_batches(batch_size=cfg["trainer"]["batch_size"], batch_format="numpy"):
        images, _, ids = batch_to_model_inputs(batch)
        preds = core([im.to(device) for im in images])
        for im, image_id, p in zip(images, ids, preds):
            p = {k: v.cpu() for k, v in p.items()}
            bbox, segm = to_coco_results(image_id, {**p, "rles": encode_masks(p["masks"])}, label_map)
            results["bbox"] += bbox
            results["segm"] += segm
            image_ids.append(image_id)
            if rank == 0 and len(overlays) < cfg["tracking"]["log_images"]:
                overlays.append((image_id, draw_predictions(im, p, label_map.names)))
    core.train()
    if world > 1:
        gathered = [None] * world if rank == 0 else None
        dist.gather_object((results, image_ids), gathered, dst=0)
        if rank != 0:
            return {}
        results = {"bbox": [r for g in gathered for r in g[0]["bbox"]],
                   "segm": [r for g in gathered for r in g[0]["segm"]]}
        image_ids = [i for g in gathered for i in g[1]]
    if config.get("_gt") is None:
        config["_gt"] = coco_ground_truth(json.loads(read_bytes(config["val_annotations"], cfg["data"]["s3"])))
    metrics = evaluate_coco(config["_gt"], results, image_ids=sorted(set(image_ids)))
    flat = {f"{t}_{m}": v for t, ms in metrics.items() for m, v in ms.items()}
    print(f"epoch {epoch} eval on {len(set(image_ids))} images: " +
          " ".join(f"{k} {v:.3f}" for k, v in flat.items() if k.endswith("_AP") or k.endswith("AP50")), flush=True)
    for image_id, picture in overlays:
        client.log_image(config["run_id"], picture, artifact_file=f"predictions/epoch_{epoch:03d}/{image_id}.png")
    return flat
