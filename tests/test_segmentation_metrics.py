from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from spade.errors import SpadeError
from spade.evaluate.segmentation_metrics import ConfusionMatrix


def t(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int64)


def test_perfect_prediction() -> None:
    target = t([[0, 0, 1], [2, 2, 1]])
    cm = ConfusionMatrix(3)
    cm.update(target, target)
    assert cm.pixel_accuracy == 1.0
    assert cm.iou.tolist() == [1.0, 1.0, 1.0]
    assert cm.mean_iou == 1.0 and cm.mean_accuracy == 1.0
    assert torch.equal(cm.matrix, torch.diag(torch.tensor([2, 2, 2])))


def test_all_wrong() -> None:
    cm = ConfusionMatrix(2)
    cm.update(t([[1, 1], [0, 0]]), t([[0, 0], [1, 1]]))
    assert cm.pixel_accuracy == 0.0
    assert cm.iou.tolist() == [0.0, 0.0]
    assert cm.mean_iou == 0.0 and cm.class_accuracy.tolist() == [0.0, 0.0]
    assert cm.matrix.tolist() == [[0, 2], [2, 0]]  # rows are the target


def test_partial_matches_hand_computed_scores() -> None:
    # target: 4 pixels of class 0, 3 of class 1, 1 of class 2
    target = t([[0, 0, 0, 0], [1, 1, 1, 2]])
    pred = t([[0, 0, 0, 1], [1, 1, 0, 2]])
    cm = ConfusionMatrix(3)
    cm.update(pred, target)
    assert cm.matrix.tolist() == [[3, 1, 0], [1, 2, 0], [0, 0, 1]]
    # class 0: TP 3, FP 1, FN 1 -> 3/5; class 1: TP 2, FP 1, FN 1 -> 2/4; class 2: 1/1
    assert cm.iou.tolist() == pytest.approx([3 / 5, 2 / 4, 1.0])
    assert cm.mean_iou == pytest.approx((0.6 + 0.5 + 1.0) / 3)
    assert cm.pixel_accuracy == pytest.approx(6 / 8)
    assert cm.class_accuracy.tolist() == pytest.approx([3 / 4, 2 / 3, 1.0])
    assert cm.mean_accuracy == pytest.approx((3 / 4 + 2 / 3 + 1) / 3)


def test_dontcare_and_out_of_range_targets_are_ignored() -> None:
    target = t([[0, 255, 1], [7, -1, 1]])
    pred = t([[0, 1, 1], [0, 1, 0]])  # wrong everywhere the target is ignored, except (1, 2)
    cm = ConfusionMatrix(2, ignore_index=255)
    cm.update(pred, target)
    assert cm.valid_pixels == 3
    assert cm.matrix.tolist() == [[1, 0], [1, 1]]
    assert cm.pixel_accuracy == pytest.approx(2 / 3)


def test_ignore_index_inside_the_class_range() -> None:
    cm = ConfusionMatrix(3, ignore_index=0)
    cm.update(t([[2, 1, 2]]), t([[0, 1, 2]]))
    assert cm.valid_pixels == 2 and cm.pixel_accuracy == 1.0
    assert math.isnan(cm.iou[0])


def test_absent_classes_are_nan_and_left_out_of_the_mean() -> None:
    cm = ConfusionMatrix(5)
    # class 3 is only predicted (IoU 0, not averaged), class 4 appears nowhere (NaN)
    cm.update(t([[0, 0, 3], [1, 1, 1]]), t([[0, 0, 0], [1, 1, 1]]))
    iou = cm.iou.tolist()
    assert iou[:2] == pytest.approx([2 / 3, 1.0])
    assert math.isnan(iou[2]) and iou[3] == 0.0 and math.isnan(iou[4])
    assert cm.present.tolist() == [True, True, False, False, False]
    assert cm.mean_iou == pytest.approx((2 / 3 + 1.0) / 2)
    acc = cm.class_accuracy.tolist()
    assert acc[:2] == pytest.approx([2 / 3, 1.0]) and all(math.isnan(a) for a in acc[2:])


def test_empty_matrix_gives_nan() -> None:
    cm = ConfusionMatrix(3)
    cm.update(t([[1]]), t([[255]]))
    assert cm.valid_pixels == 0
    assert math.isnan(cm.pixel_accuracy) and math.isnan(cm.mean_iou) and math.isnan(cm.mean_accuracy)
    assert cm.as_dict()["mean_iou"] is None


def test_batched_equals_per_image_and_numpy_input() -> None:
    gen = torch.Generator().manual_seed(0)
    target = torch.randint(0, 6, (4, 9, 11), generator=gen)
    target[:, :2, :2] = 255
    pred = torch.randint(0, 6, (4, 9, 11), generator=gen)
    batched, single = ConfusionMatrix(6), ConfusionMatrix(6)
    batched.update(pred, target)
    for p, g in zip(pred, target, strict=True):
        single.update(p.numpy(), g.numpy().astype(np.uint8))
    assert torch.equal(batched.matrix, single.matrix)
    assert batched.matrix.dtype == torch.int64
    assert batched.valid_pixels == 4 * (9 * 11 - 4)
    merged = ConfusionMatrix(6)
    merged.merge(batched)
    merged.merge(single)
    assert torch.equal(merged.matrix, 2 * batched.matrix)
    merged.reset()
    assert merged.valid_pixels == 0


def test_bad_inputs_are_explained() -> None:
    cm = ConfusionMatrix(3)
    with pytest.raises(SpadeError, match=r"shape \(2, 3\) differs from target shape \(3, 2\)"):
        cm.update(torch.zeros(2, 3, dtype=torch.int64), torch.zeros(3, 2, dtype=torch.int64))
    with pytest.raises(SpadeError, match="integer class ids.*argmax"):
        cm.update(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(SpadeError, match=r"0\.\.2, got 0\.\.3"):
        cm.update(t([[0, 3]]), t([[0, 1]]))
    cm.update(t([[0, 9]]), t([[0, 255]]))  # predictions on ignored pixels are not checked
    with pytest.raises(SpadeError, match="positive integer"):
        ConfusionMatrix(0)
    assert cm.valid_pixels == 1


def test_as_dict_is_json_ready() -> None:
    cm = ConfusionMatrix(3)
    cm.update(t([[0, 0, 1, 2]]), t([[0, 0, 1, 1]]))
    data = cm.as_dict(class_names=["sky", "grass", "rock"])
    json.dumps(data, allow_nan=False)
    assert data["pixel_accuracy"] == pytest.approx(0.75)
    assert data["mean_iou"] == pytest.approx((1.0 + 0.5) / 2)
    assert data["classes_present"] == 2 and data["valid_pixels"] == 4
    assert data["per_class"]["grass"] == {
        "id": 1,
        "iou": 0.5,
        "accuracy": 0.5,
        "target_pixels": 2,
        "predicted_pixels": 1,
    }
    assert data["per_class"]["rock"]["iou"] == 0.0 and data["per_class"]["rock"]["accuracy"] is None
    assert list(cm.as_dict()["per_class"]) == ["0", "1", "2"]
    with pytest.raises(SpadeError, match="2 class names for 3 classes"):
        cm.as_dict(["a", "b"])
    with pytest.raises(SpadeError, match="repeated: a"):
        cm.as_dict(["a", "a", "b"])


def test_agrees_with_torchmetrics() -> None:
    import torchmetrics.classification as tm  # a dev dependency: the reference implementation

    n, ignore = 7, 255
    gen = torch.Generator().manual_seed(1)
    # blocky maps so that classes overlap a lot; class 6 is never in the target, class 5 never predicted
    target = torch.randint(0, 6, (3, 4, 5), generator=gen).repeat_interleave(4, 1).repeat_interleave(4, 2)
    pred = torch.where(
        torch.rand(target.shape, generator=gen) < 0.7, target, torch.randint(0, 7, target.shape, generator=gen)
    )
    pred[pred == 5] = 6
    target[:, :3, :] = ignore
    cm = ConfusionMatrix(n, ignore_index=ignore)
    for p, g in zip(pred, target, strict=True):
        cm.update(p, g)

    jaccard = tm.MulticlassJaccardIndex(n, average="none", ignore_index=ignore)(pred, target)
    present = cm.present
    assert present.tolist() == [True] * 6 + [False]
    assert torch.allclose(cm.iou[present], jaccard[present].double(), atol=1e-6)
    assert cm.iou[6] == pytest.approx(float(jaccard[6]), abs=1e-6)  # only predicted: 0 in both
    assert cm.mean_iou == pytest.approx(float(jaccard[present].mean()), abs=1e-6)

    accuracy = tm.MulticlassAccuracy(n, average="micro", ignore_index=ignore)(pred, target)
    assert cm.pixel_accuracy == pytest.approx(float(accuracy), abs=1e-6)
    per_class = tm.MulticlassAccuracy(n, average="none", ignore_index=ignore)(pred, target)
    assert torch.allclose(cm.class_accuracy[present], per_class[present].double(), atol=1e-6)
    confusion = tm.MulticlassConfusionMatrix(n, ignore_index=ignore)(pred, target)
    assert torch.equal(cm.matrix, confusion)
