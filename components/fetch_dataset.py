"""Stage 1: fetch the dataset (folder, archive, http(s), s3:// or flickr:?text=...) into a Dataset artifact."""

from typing import NamedTuple

from kfp.dsl import Dataset, Input, Output

from components import spade_component


@spade_component
def fetch_dataset(
    source: str,
    dataset: Output[Dataset],
    sha256: str = "",
    layout: str = "auto",
    max_bytes: str = "100G",
    max_entries: int = 1000000,
    max_ratio: float = 100.0,
) -> NamedTuple("FetchOutputs", needs_labels=bool, layout=str, fingerprint=str, files=int):
    """Fetch `source` with spade.data.fetch; `needs_labels` is true for an unlabeled photo collection.

    max_bytes, max_entries and max_ratio bound what an archive may unpack to (params.yaml `fetch`).
    """
    import collections

    from components.runtime import DATASET_ROOT_KEY
    from spade.data.fetch import ExtractLimits, parse_size
    from spade.data.fetch import fetch_dataset as fetch

    limits = ExtractLimits(parse_size(max_bytes), int(max_entries), float(max_ratio))
    result = fetch(source, dataset.path, sha256=sha256 or None, layout=layout, limits=limits)
    dataset.metadata.update(
        {
            DATASET_ROOT_KEY: "",  # the dataset is the artifact's folder itself
            "layout": result.layout,
            "fingerprint": result.fingerprint,
            "files": result.files,
            "source": result.source,
            "needs_labels": result.needs_labels,
        }
    )
    print(f"fetched {result.files} file(s) from {result.source}: layout {result.layout}, {result.fingerprint}")
    outputs = collections.namedtuple("FetchOutputs", ["needs_labels", "layout", "fingerprint", "files"])
    return outputs(bool(result.needs_labels), result.layout, result.fingerprint, int(result.files))


@spade_component
def use_labeled_dataset(fetched: Input[Dataset], dataset: Output[Dataset]):
    """The labeled branch: the fetched dataset goes on to training as it is (no pseudo-labelling)."""
    from components.runtime import DATASET_ROOT_KEY, dataset_root, link_tree

    link_tree(dataset_root(fetched.path, fetched.metadata), dataset.path)
    dataset.metadata.update({**fetched.metadata, DATASET_ROOT_KEY: ""})
