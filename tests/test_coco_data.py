"""COCO records, validation report, image decoding, augmentation and COCO evaluation."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from mrcnn.data.coco import CategoryMap, load_coco_records
from mrcnn.data.images import ImageDecodeError, decode_image
from mrcnn.data.shapes import write_shapes_dataset
from mrcnn.data.transforms import horizontal_flip, resize_shorter_side, to_model_inputs
from mrcnn.evaluation.coco_eval import BACKENDS, evaluate_coco, evaluate_coco_stats, to_coco_results
from mrcnn.masks import decode_rle_masks, encode_masks


def _square_mask(h, w, x1, y1, x2, y2):
    m = np.zeros((h, w), dtype=np.uint8)
    m[y1:y2, x1:x2] = 1
    return m


def _dataset():
    """Category ids with gaps, every segmentation flavour, and one of each problem."""
    rle = mask_utils.encode(np.asfortranarray(_square_mask(60, 80, 40, 10, 60, 30)))
    uncompressed = {"size": [60, 80], "counts": [10 * 60 + 10, 20, 40, 20, 80 * 60 - 10 * 60 - 10 - 60]}
    anns = [
        {"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 10, 20, 20], "iscrowd": 0,
         "segmentation": [[10, 10, 30, 10, 30, 30, 10, 30]]},
        {"id": 2, "image_id": 1, "category_id": 11, "bbox": [40, 10, 20, 20], "iscrowd": 0,
         "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}},
        {"id": 3, "image_id": 1, "category_id": 3, "bbox": [10, 0, 2, 20], "iscrowd": 0,
         "segmentation": uncompressed},
        {"id": 4, "image_id": 1, "category_id": 3, "bbox": [0, 0, 80, 60], "iscrowd": 1,
         "segmentation": {"size": [60, 80], "counts": [0, 4800]}},
        {"id": 5, "image_id": 1, "category_id": 99, "bbox": [1, 1, 5, 5], "segmentation": [[1, 1, 5, 1, 5, 5]]},
        {"id": 6, "image_id": 1, "category_id": 7, "bbox": [1, 1, 0, 5], "segmentation": [[1, 1, 5, 1, 5, 5]]},
        {"id": 7, "image_id": 1, "category_id": 7, "bbox": [1, 1, 5, 5], "segmentation": [[1, 1, 5, 1]]},
        {"id": 7, "image_id": 2, "category_id": 7, "bbox": [1, 1, 5, 5], "segmentation": [[1, 1, 5, 1, 5, 5]]},
        {"id": 8, "image_id": 2, "category_id": 7, "bbox": [70, 50, 30, 30],
         "segmentation": [[70, 50, 80, 50, 80, 60, 70, 60]]},
    ]
    return {
        "images": [{"id": 1, "file_name": "a.jpg", "height": 60, "width": 80},
                   {"id": 2, "file_name": "b.jpg", "height": 60, "width": 80},
                   {"id": 2, "file_name": "dup.jpg", "height": 60, "width": 80},
                   {"id": 3, "file_name": "empty.jpg", "height": 60, "width": 80}],
        "annotations": anns,
        "categories": [{"id": 3, "name": "c3"}, {"id": 11, "name": "c11"}, {"id": 7, "name": "c7"}],
    }


def test_records_labels_and_report(tmp_path):
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(_dataset()))
    records, cats, report = load_coco_records(str(path))
    assert cats.category_ids == [3, 7, 11] and cats.names == ["c3", "c7", "c11"]
    assert cats.label(11) == 3 and cats.category_id(2) == 7 and cats.num_classes == 4
    by_id = {r["image_id"]: r for r in records}
    anns = by_id[1]["annotations"]
    assert [a["label"] for a in anns] == [2, 3, 1, 1]
    assert [a["iscrowd"] for a in anns] == [0, 0, 0, 1]
    for a in anns:  # every flavour became compressed RLE with str counts
        assert isinstance(a["rle"]["counts"], str) and a["rle"]["size"] == [60, 80]
    dense = decode_rle_masks([anns[1]["rle"]], (60, 80))[0].numpy()
    assert (dense == _square_mask(60, 80, 40, 10, 60, 30)).all()
    assert by_id[2]["annotations"][0]["bbox"] == [70.0, 50.0, 80.0, 60.0]  # clipped
    assert report.counts == {
        "unknown category id": 1, "zero or negative area box": 1, "degenerate polygon": 1,
        "duplicate annotation id": 1, "duplicate image id": 1, "box outside the image (clipped)": 1,
        "image without annotations": 1,
    }
    assert "ann 5 category 99" in report.examples["unknown category id"][0]
    assert "empty.jpg (id 3)" in str(report)
    records, _, _ = load_coco_records(_dataset(), keep_empty=False)
    assert {r["image_id"] for r in records} == {1, 2}


def test_missing_image_is_named_or_skipped():
    exists = lambda f: f != "empty.jpg"  # noqa: E731
    with pytest.raises(FileNotFoundError, match=r"'empty.jpg' \(id 3\) is missing.*missing_images=skip"):
        load_coco_records(_dataset(), image_exists=exists)
    records, _, report = load_coco_records(_dataset(), image_exists=exists, missing_images="skip")
    assert 3 not in {r["image_id"] for r in records}
    assert report.counts["missing image file"] == 1


def test_not_a_coco_file(tmp_path):
    p = tmp_path / "x.json"
    p.write_text("{\"images\": []}")
    with pytest.raises(ValueError, match="no 'annotations' key"):
        load_coco_records(str(p))
    p.write_text("{oops")
    with pytest.raises(ValueError, match="x.json is not valid JSON"):
        load_coco_records(str(p))


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def test_decode_image_modes_and_exif():
    rgb = Image.new("RGB", (40, 20), (200, 10, 10))
    assert decode_image(_encode(rgb.convert("L"), "PNG")).shape == (20, 40, 3)
    assert decode_image(_encode(rgb.convert("P"), "PNG")).shape == (20, 40, 3)
    rgba = Image.new("RGBA", (40, 20), (255, 255, 255, 0))
    assert decode_image(_encode(rgba, "PNG")).max() == 0  # transparent over black
    cmyk = decode_image(_encode(rgb.convert("CMYK"), "JPEG"))
    assert cmyk.shape == (20, 40, 3) and cmyk[..., 0].mean() > 150
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    rotated = decode_image(_encode(rgb, "JPEG", exif=exif.tobytes()))
    assert rotated.shape == (40, 20, 3)
    with pytest.raises(ImageDecodeError, match="cannot decode image bad.jpg"):
        decode_image(b"not an image", "bad.jpg")


def test_flip_and_resize_move_boxes_and_masks_together():
    image = np.zeros((60, 80, 3), dtype=np.uint8)
    mask = _square_mask(60, 80, 10, 20, 30, 50)
    ann = {"bbox": [10.0, 20.0, 30.0, 50.0], "label": 1, "iscrowd": 0, "rle": encode_masks(mask[None])[0]}
    flipped, (fa,) = horizontal_flip(image, [ann])
    assert fa["bbox"] == [50.0, 20.0, 70.0, 50.0]
    assert (decode_rle_masks([fa["rle"]], (60, 80))[0].numpy() == mask[:, ::-1]).all()
    resized, (ra,) = resize_shorter_side(image, [ann], size=120, max_size=1000)
    assert resized.shape == (120, 160, 3)
    assert ra["bbox"] == [20.0, 40.0, 60.0, 100.0]
    big = decode_rle_masks([ra["rle"]], (120, 160))[0]
    assert big.sum() == 4 * mask.sum()
    crowd = dict(ann, iscrowd=1)
    tensor, target = to_model_inputs(resized, [ra, crowd])
    assert tensor.shape == (3, 120, 160) and tensor.dtype == torch.float32 and tensor.max() <= 1
    assert target["boxes"].shape == (1, 4) and target["labels"].tolist() == [1] and len(target["masks"]) == 1


@pytest.mark.parametrize("size", [37, 45, 61, 97, 150])
def test_resized_masks_are_torchs_nearest_neighbours(size):
    """Augmentation resizes masks in numpy (decoding processes import no torch), pixel for pixel
    as `torch.nn.functional.interpolate(mode="nearest")`."""
    rng = np.random.default_rng(size)
    masks = (rng.random((3, 60, 80)) > 0.5).astype(np.uint8)
    anns = [{"bbox": [0.0, 0.0, 80.0, 60.0], "label": 1, "rle": r} for r in encode_masks(masks)]
    resized, out = resize_shorter_side(np.zeros((60, 80, 3), np.uint8), anns, size=size, max_size=1000)
    want = torch.nn.functional.interpolate(torch.from_numpy(masks)[:, None].float(), size=resized.shape[:2])[:, 0]
    assert torch.equal(decode_rle_masks([a["rle"] for a in out], resized.shape[:2]), want.byte())


def test_shapes_dataset_is_deterministic_and_valid(tmp_path):
    a = write_shapes_dataset(tmp_path / "a", train=6, val=2, size=96, seed=3)
    b = write_shapes_dataset(tmp_path / "b", train=6, val=2, size=96, seed=3)
    ja = json.loads((a / "annotations/instances_train.json").read_text())
    jb = json.loads((b / "annotations/instances_train.json").read_text())
    assert ja == jb
    assert (a / "train/000000.jpg").read_bytes() == (b / "train/000000.jpg").read_bytes()
    kinds = {type(x["segmentation"]).__name__ for x in ja["annotations"]}
    assert kinds == {"list", "dict"}  # polygons and RLE
    assert {x["category_id"] for x in ja["annotations"]} == {1, 2, 3}
    records, cats, report = load_coco_records(str(a / "annotations/instances_train.json"),
                                              image_exists=lambda f: (a / f).is_file())
    assert len(records) == 6 and cats.names == ["circle", "square", "triangle"]
    assert sum(report.counts.values()) == report.counts.get("image without annotations", 0)
    im = Image.open(a / "train/000000.jpg")
    assert im.format == "JPEG" and im.size == (96, 96)


def _eval_case(shift: float):
    gt = {"images": [{"id": i, "file_name": f"{i}.jpg", "height": 200, "width": 200} for i in (1, 2)],
          "categories": [{"id": 5, "name": "thing"}], "annotations": []}
    preds = {"bbox": [], "segm": []}
    cats = CategoryMap([5], ["thing"])
    for i in (1, 2):
        mask = _square_mask(200, 200, 50, 50, 150, 150)
        rle = encode_masks(mask[None])[0]
        gt["annotations"].append({"id": i, "image_id": i, "category_id": 5, "bbox": [50, 50, 100, 100],
                                  "area": 10000.0, "iscrowd": 0, "segmentation": rle})
        s = int(shift)
        pred_mask = _square_mask(200, 200, 50 + s, 50, 150 + s, 150)
        b, m = to_coco_results(i, {"boxes": torch.tensor([[50.0 + s, 50, 150 + s, 150]]),
                                   "labels": torch.tensor([1]), "scores": torch.tensor([0.9]),
                                   "masks": torch.from_numpy(pred_mask[None]).bool()}, cats)
        preds["bbox"] += b
        preds["segm"] += m
    return gt, preds


@pytest.mark.parametrize("backend", BACKENDS)
def test_coco_eval_perfect_and_shifted(backend):
    gt, preds = _eval_case(0)
    m = evaluate_coco(gt, preds, backend=backend)
    for t in ("bbox", "segm"):
        assert m[t]["AP"] == pytest.approx(1.0) and m[t]["AP50"] == pytest.approx(1.0)
    # Shift by 20 px: IoU = 80*100 / (120*100) = 2/3, a true positive at IoU thresholds
    # 0.50, 0.55, 0.60, 0.65 of the ten: AP = 0.4, AP50 = 1, AP75 = 0; 100x100 is "large".
    gt, preds = _eval_case(20)
    m = evaluate_coco(gt, preds, backend=backend)
    for t in ("bbox", "segm"):
        assert m[t]["AP"] == pytest.approx(0.4)
        assert m[t]["AP50"] == pytest.approx(1.0) and m[t]["AP75"] == pytest.approx(0.0)
        assert m[t]["APl"] == pytest.approx(0.4) and math.isnan(m[t]["APs"])
    assert evaluate_coco(gt, {"bbox": [], "segm": []}, backend=backend)["segm"]["AP"] == 0.0


def test_the_default_cocoeval_gives_pycocotools_numbers():
    """faster-coco-eval, the default, against pycocotools (the authority) on 60 images of 7
    instances and 100 detections each (jittered, misclassified and random, RLE masks): all 12
    summary numbers agree to summation order (seen: 6e-17)."""
    from tests.helpers.coco import generate_coco

    gt, results = generate_coco(60, 7, 100, seed=3)
    assert BACKENDS[0] == "faster"
    for iou_type in ("bbox", "segm"):
        dets = results if iou_type == "segm" else [{k: v for k, v in r.items() if k != "segmentation"}
                                                   for r in results]
        ours = evaluate_coco_stats(gt, dets, iou_type)
        theirs = evaluate_coco_stats(gt, dets, iou_type, backend="pycocotools")
        assert 0 < theirs[0] < 1 and max(abs(a - b) for a, b in zip(ours, theirs)) <= 1e-12, (iou_type, ours, theirs)
