"""Stage 2 (unlabeled photo collections only): label the photos with a segmenter into a custom-layout dataset."""

from kfp.dsl import Dataset, Input, Output

from components import spade_component


@spade_component
def pseudolabel(
    photos: Input[Dataset],
    dataset: Output[Dataset],
    segmenter: str = "small",
    segmenter_weights: str = "runs/segmenter/small_segmenter.pt",
    min_confidence: float = 0.0,
    batch_size: int = 8,
    device: str = "auto",
) -> int:
    """spade.pseudolabel over the photos (ROOT/train and ROOT/val, else ROOT/images or ROOT); returns the count."""
    from pathlib import Path

    from components.runtime import DATASET_ROOT_KEY, dataset_root, pseudolabel_photos
    from spade.errors import SpadeError

    reports = pseudolabel_photos(
        dataset_root(photos.path, photos.metadata),
        Path(dataset.path),
        segmenter=segmenter,
        weights=segmenter_weights,
        min_confidence=min_confidence,
        batch_size=batch_size,
        device_name=device,
    )
    labelled = sum(r["written"] + r["skipped_existing"] for r in reports)
    if labelled == 0:
        raise SpadeError("pseudo-labelling kept no photo (all unreadable or below min_confidence)")
    dataset.metadata.update(
        {DATASET_ROOT_KEY: "", "layout": "custom", "pseudolabel": reports, "source": photos.metadata.get("source", "")}
    )
    return labelled
