import numpy as np
import pytest
import torch
from PIL import Image

from spade.config import ModelConfig
from spade.errors import SpadeError
from spade.labels import instance_edges, read_id_map, semantic_input, to_class_ids

COCO = ModelConfig.from_preset("coco")
ADE = ModelConfig.from_preset("ade20k")
CITY = ModelConfig.from_preset("cityscapes")


def test_255_becomes_the_dontcare_class():
    ids = to_class_ids(np.array([[0, 181, 255]]), COCO)
    assert ids.tolist() == [[0, 181, 182]]


def test_ade20k_files_shift_by_one_and_zero_is_dontcare():
    ids = to_class_ids(np.array([[0, 1, 150, 255]]), ADE)
    assert ids.tolist() == [[150, 0, 149, 150]]


def test_out_of_range_values_are_named_in_file_terms():
    with pytest.raises(SpadeError, match=r"x.png: label values 182, 200 are out of range .* 182 classes"):
        to_class_ids(np.array([[3, 182, 200, 255]]), COCO, source="x.png")
    with pytest.raises(SpadeError, match="label values 151 "):
        to_class_ids(np.array([[151]]), ADE)
    with pytest.raises(SpadeError, match="label values 255 .*no don't-care"):
        to_class_ids(np.array([[0, 255]]), CITY)


def test_one_hot_with_dontcare_and_instance_edges():
    label = torch.tensor([[[[0, 182], [5, 5]]]])
    inst = torch.tensor([[[[1, 1], [1, 2]]]])
    seg = semantic_input(label, COCO, inst)
    assert seg.shape == (1, 184, 2, 2)
    assert seg[0, :183].sum(0).tolist() == [[1, 1], [1, 1]]
    assert seg[0, 182, 0, 1] == 1 and seg[0, 5, 1, 0] == 1 and seg[0, 0, 0, 0] == 1
    assert seg[0, 183].tolist() == [[0, 1], [1, 1]]


def test_instance_edges_mark_both_sides_of_each_boundary():
    inst = torch.tensor([[[[1, 1, 1, 1], [1, 2, 2, 1], [1, 1, 1, 1], [3, 3, 3, 3]]]])
    expected = [[0, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]]
    assert instance_edges(inst)[0, 0].int().tolist() == expected
    assert instance_edges(torch.zeros(1, 1, 3, 3, dtype=torch.long)).sum() == 0


def test_semantic_input_checks_its_inputs():
    with pytest.raises(SpadeError, match="instance map is required"):
        semantic_input(torch.zeros(1, 1, 4, 4, dtype=torch.long), COCO)
    with pytest.raises(SpadeError, match="differs from label shape"):
        semantic_input(torch.zeros(1, 1, 4, 4, dtype=torch.long), COCO, torch.zeros(1, 1, 4, 5))
    with pytest.raises(SpadeError, match=r"class ids must lie in 0..150"):
        semantic_input(torch.full((1, 1, 2, 2), 151), ADE)


@pytest.mark.parametrize("dtype, suffix", [(np.uint8, "png"), (np.uint16, "png"), (np.int32, "tif")])
def test_id_maps_read_raw_values(tmp_path, dtype, suffix):
    # 8-bit COCO/ADE labels, 16-bit Cityscapes instanceIds (26001 = class 26, instance 1), 32-bit ids
    arr = np.array([[0, 7], [26001 if dtype != np.uint8 else 255, 3]], dtype=dtype)
    Image.fromarray(arr).save(tmp_path / f"m.{suffix}")
    assert read_id_map(tmp_path / f"m.{suffix}").tolist() == arr.astype(np.int64).tolist()


def test_palette_maps_give_indices(tmp_path):
    img = Image.fromarray(np.array([[0, 2], [1, 2]], np.uint8), mode="L").convert("P")
    img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    img.save(tmp_path / "p.png")
    assert read_id_map(tmp_path / "p.png").tolist() == [[0, 2], [1, 2]]


def test_colour_and_broken_files_are_refused(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "rgb.png")
    with pytest.raises(SpadeError, match="rgb.png: label map must be a single-channel image.*got mode RGB"):
        read_id_map(tmp_path / "rgb.png")
    (tmp_path / "junk.png").write_bytes(b"not a png at all")
    with pytest.raises(SpadeError, match="junk.png: cannot read label map"):
        read_id_map(tmp_path / "junk.png")
    with pytest.raises(SpadeError, match="missing.png: no such file"):
        read_id_map(tmp_path / "missing.png")
