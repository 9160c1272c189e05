"""Segmentation metrics from one confusion matrix: pixel accuracy, per-class IoU and accuracy, mIoU.

The matrix is accumulated over a whole evaluation set and the scores are computed from
the totals (not averaged per image), as the segmentation evaluations that SPADE reports do.

Conventions (the paper's numbers come from the DeepLab evaluation code,
kazuto1011/deeplab-pytorch `libs/utils/metric.py: scores`):

- rows are the target (ground-truth) class, columns the predicted class;
- target pixels equal to `ignore_index` (the don't-care id) or outside [0, num_classes)
  are left out of every score; predictions must be valid class ids;
- IoU of class c = TP / (TP + FP + FN); NaN when c is absent from both prediction and target;
- mIoU = mean IoU over the classes that occur in the target (the evaluation set's ground
  truth). A class that is only predicted gets IoU 0 but is not averaged in. Earlier
  revisions of that file averaged over every class with a non-zero union instead; the two
  agree whenever each predicted class also occurs somewhere in the target;
- per-class accuracy = TP / target pixels of c (recall); NaN for classes absent from the
  target; mean accuracy averages it over the classes present;
- pixel accuracy = correct pixels / valid pixels.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from spade.errors import SpadeError


class ConfusionMatrix:
    """Counts of (target class, predicted class) pixel pairs, accumulated over batches.

    `matrix[t, p]` is the number of valid pixels of target class t predicted as p (int64,
    kept on `device`, CPU by default; updates may come from any device).

    >>> cm = ConfusionMatrix(3, ignore_index=255)
    >>> cm.update(torch.tensor([[0, 1], [1, 2]]), torch.tensor([[0, 1], [2, 255]]))
    >>> cm.pixel_accuracy
    0.6666666666666666
    """

    def __init__(self, num_classes: int, *, ignore_index: int | None = 255, device: str | torch.device = "cpu") -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise SpadeError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros((num_classes, num_classes), dtype=torch.int64, device=device)

    def reset(self) -> None:
        self.matrix.zero_()

    def update(self, pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> None:
        """Add label maps of class ids: one (H, W) pair or a batch (N, H, W); shapes must match."""
        pred, target = torch.as_tensor(pred), torch.as_tensor(target)
        if pred.shape != target.shape:
            raise SpadeError(
                f"prediction shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}; "
                "pass label maps of the same size (resize the prediction to the target's size first)"
            )
        for what, t in (("prediction", pred), ("target", target)):
            if t.is_floating_point() or t.is_complex():
                raise SpadeError(
                    f"{what} must hold integer class ids, got dtype {t.dtype}; take argmax over the class scores first"
                )
        n = self.num_classes
        pred = pred.reshape(-1).to(torch.int64)
        target = target.reshape(-1).to(device=pred.device, dtype=torch.int64)
        valid = (target >= 0) & (target < n)
        if self.ignore_index is not None:
            valid &= target != self.ignore_index
        pred, target = pred[valid], target[valid]
        if pred.numel():
            lo, hi = torch.aminmax(pred)
            if int(lo) < 0 or int(hi) >= n:
                raise SpadeError(f"predicted class ids must lie in 0..{n - 1}, got {int(lo)}..{int(hi)}")
        counts = torch.bincount(target * n + pred, minlength=n * n).reshape(n, n)
        self.matrix += counts.to(self.matrix.device)

    def merge(self, other: ConfusionMatrix) -> None:
        """Add another accumulator's counts (e.g. from another worker)."""
        if other.num_classes != self.num_classes:
            raise SpadeError(f"cannot merge a {other.num_classes}-class matrix into a {self.num_classes}-class one")
        self.matrix += other.matrix.to(self.matrix.device)

    # ----------------------------------------------------------------------- scores

    def _counts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        m = self.matrix.detach().to("cpu", torch.float64)
        return m.diagonal(), m.sum(dim=1), m.sum(dim=0)

    @property
    def valid_pixels(self) -> int:
        return int(self.matrix.sum())

    @property
    def present(self) -> torch.Tensor:
        """(num_classes,) bool: the classes that occur in the target."""
        return self.matrix.sum(dim=1).cpu() > 0

    @property
    def pixel_accuracy(self) -> float:
        """Correct pixels / valid pixels; NaN before any valid pixel."""
        tp, target, _ = self._counts()
        total = float(target.sum())
        return float(tp.sum()) / total if total else math.nan

    @property
    def iou(self) -> torch.Tensor:
        """(num_classes,) float64 IoU per class; NaN for classes in neither prediction nor target."""
        tp, target, predicted = self._counts()
        union = target + predicted - tp
        return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))

    @property
    def class_accuracy(self) -> torch.Tensor:
        """(num_classes,) float64 share of each class's target pixels predicted right; NaN where absent."""
        tp, target, _ = self._counts()
        return torch.where(target > 0, tp / target.clamp(min=1), torch.full_like(tp, math.nan))

    @property
    def mean_iou(self) -> float:
        """Mean IoU over the classes present in the target; NaN when none is."""
        return _mean(self.iou[self.present])

    @property
    def mean_accuracy(self) -> float:
        """Mean per-class accuracy over the classes present in the target; NaN when none is."""
        return _mean(self.class_accuracy[self.present])

    def as_dict(self, class_names: list[str] | tuple[str, ...] | None = None) -> dict:
        """The scores as JSON-ready data (NaN written as null), per class keyed by name or by id."""
        if class_names is not None and len(class_names) != self.num_classes:
            raise SpadeError(f"got {len(class_names)} class names for {self.num_classes} classes")
        keys = [str(i) for i in range(self.num_classes)] if class_names is None else list(class_names)
        if len(set(keys)) != len(keys):
            repeated = sorted({k for k in keys if keys.count(k) > 1})
            raise SpadeError(f"class names must be unique; repeated: {', '.join(repeated)}")
        iou, accuracy = self.iou.tolist(), self.class_accuracy.tolist()
        target = self.matrix.sum(dim=1).tolist()
        predicted = self.matrix.sum(dim=0).tolist()
        return {
            "pixel_accuracy": _finite_or_none(self.pixel_accuracy),
            "mean_iou": _finite_or_none(self.mean_iou),
            "mean_accuracy": _finite_or_none(self.mean_accuracy),
            "num_classes": self.num_classes,
            "classes_present": int(self.present.sum()),
            "valid_pixels": self.valid_pixels,
            "ignore_index": self.ignore_index,
            "per_class": {
                key: {
                    "id": i,
                    "iou": _finite_or_none(iou[i]),
                    "accuracy": _finite_or_none(accuracy[i]),
                    "target_pixels": int(target[i]),
                    "predicted_pixels": int(predicted[i]),
                }
                for i, key in enumerate(keys)
            },
        }


def _mean(values: torch.Tensor) -> float:
    return float(values.mean()) if values.numel() else math.nan


def _finite_or_none(value: float) -> float | None:
    return None if math.isnan(value) else float(value)
