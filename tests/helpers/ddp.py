"""Training ranks of a real DDP group (gloo on 127.0.0.1) in processes of their own, fed batches
as uneven as a dynamic split may deal them."""

from __future__ import annotations

import json

import numpy as np


def square_batch(seed: int, size: int = 64) -> dict:
    """A numpy batch as Ray Data gives the training loop: two images with a square each."""
    from mrcnn.masks import encode_masks

    rng = np.random.default_rng(seed)
    images, targets = [], []
    for _ in range(2):
        x, y, s = (int(v) for v in rng.integers(4, size // 2, 3))
        image = (rng.random((size, size, 3)) * 40).astype(np.uint8)
        mask = np.zeros((1, size, size), np.uint8)
        mask[0, y:y + s, x:x + s] = 1
        image[mask[0] > 0] = 220
        images.append(image)
        targets.append(json.dumps([{"bbox": [x, y, x + s, y + s], "label": 1, "rle": encode_masks(mask)[0]}]))
    return {"image": images, "target": targets, "image_id": np.arange(2)}


def uneven_rank(rank: int, world: int, port: int, shares: list[list[int]], out: str) -> None:
    """Train epochs in which this rank gets `shares[epoch][rank]` batches; write what it ended
    with (steps, images counted, LR, parameters) to `out`.rank.pt."""
    import torch
    import torch.distributed as dist

    from mrcnn import ModelConfig, build_model
    from workflows.training.steps import Progress, train_one_epoch

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(rank)  # different replicas at first: DDP starts them all from rank 0's
    cfg = ModelConfig(num_classes=2)
    cfg.backbone.name, cfg.backbone.trainable_layers = "resnet18", 3
    cfg.transform.min_size, cfg.transform.max_size = [64], 64
    cfg.rpn.pre_nms_top_n_train = cfg.rpn.post_nms_top_n_train = 50
    cfg.roi_heads.batch_size_per_image = 16
    model = torch.nn.parallel.DistributedDataParallel(build_model(cfg))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    progress = Progress(per_step=2 * world)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0 if progress.position < 3 else 0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    step, per_epoch = 0, []
    for epoch, share in enumerate(shares):
        batches = iter([square_batch(100 * epoch + 10 * rank + i) for i in range(share[rank])])
        step, stats = train_one_epoch(model, optimizer, scheduler, scaler, batches, torch.device("cpu"), step,
                                      progress)
        per_epoch.append({"step": step, "images": stats.images, "progress": progress.images,
                          "loss": stats.mean_losses()})
    torch.save({"epochs": per_epoch, "lr": optimizer.param_groups[0]["lr"],
                "params": torch.cat([p.detach().flatten() for p in model.parameters()]),
                "momentum": torch.cat([optimizer.state[p]["momentum_buffer"].flatten() for p in model.parameters()
                                       if p in optimizer.state])}, f"{out}.{rank}.pt")
    dist.destroy_process_group()
