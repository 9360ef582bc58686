"""``imagefolder``: class-named image folders of any classes, sizes and channels, as folders or zips,
two-split or one-tree layouts, normalized with the training split's statistics, cached, and the
one-line errors for bad sources."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedhet.data import load_dataset
from fedhet.data._imagefolder import channel_stats


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDHET_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FEDHET_DATA", raising=False)


def _image(value: int, size=(6, 5), gray=False) -> Image.Image:
    h, w = size
    if gray:
        return Image.fromarray(np.full((h, w), value, np.uint8), mode="L")
    return Image.fromarray(np.stack([np.full((h, w), value, np.uint8), np.full((h, w), 255 - value, np.uint8),
                                     np.full((h, w), 10, np.uint8)], axis=-1))  # fmt: skip


def _tree(folder: Path, layout: dict[str, dict[str, list[int]]], suffix=".png", **kw) -> Path:
    for split, classes in layout.items():
        for cls, values in classes.items():
            d = folder / split / cls if split else folder / cls
            d.mkdir(parents=True, exist_ok=True)
            for i, v in enumerate(values):
                _image(v, **kw).save(d / f"{i:02d}{suffix}")
    return folder


TWO_SPLITS = {"train": {"rose": [0, 20], "tulip": [40, 60, 80]}, "test": {"rose": [100], "tulip": [120]}}


def test_two_split_folder_by_hand(tmp_path):
    src = _tree(tmp_path / "flowers", TWO_SPLITS)
    b = load_dataset("imagefolder", path=str(src))
    assert b.class_names == ("rose", "tulip") and b.num_classes == 2
    assert b.input_shape == (3, 6, 5) and len(b.train) == 5 and len(b.test) == 2
    assert b.train.y.tolist() == [0, 0, 1, 1, 1] and b.test.y.tolist() == [0, 1]
    # channel 0 holds the values 0, 20, 40, 60, 80 (scaled by 1/255): mean 40/255, std sqrt(800)/255
    mean, std = b.info["normalization"]["mean"], b.info["normalization"]["std"]
    assert mean[0] == pytest.approx(40 / 255) and std[0] == pytest.approx(np.sqrt(800) / 255)
    assert mean[2] == pytest.approx(10 / 255) and std[2] == 1.0  # a constant channel keeps std 1
    first = (0 / 255 - mean[0]) / std[0]
    assert torch.allclose(b.train.x[0, 0], torch.full((6, 5), first))
    assert torch.allclose(b.train.x[:, 0].mean(), torch.tensor(0.0), atol=1e-6)
    assert b.info["image_size"] == [6, 5] and b.info["channels"] == 3


def test_one_tree_split_per_class_seeded_grayscale_and_resized(tmp_path):
    src = _tree(
        tmp_path / "digits", {"": {"a": list(range(0, 50, 5)), "b": list(range(100, 150, 5))}}, gray=True, suffix=".jpg"
    )
    b = load_dataset("imagefolder", path=str(src), size=4, test_fraction=0.3, seed=1)
    assert b.input_shape == (1, 4, 4) and b.info["channels"] == 1
    assert b.test.y.tolist() == [0, 0, 0, 1, 1, 1] and len(b.train) == 14
    again = load_dataset("imagefolder", path=str(src), size=4, test_fraction=0.3, seed=1)
    assert torch.equal(again.test.x, b.test.x)
    other = load_dataset("imagefolder", path=str(src), size=4, test_fraction=0.3, seed=2)
    assert not torch.equal(other.test.x, b.test.x)
    rgb = load_dataset("imagefolder", path=str(src), size=[4, 3], channels=3)
    assert rgb.input_shape == (3, 4, 3) and len(rgb.test) == 4  # test_fraction 0.2 by default


def test_zip_with_a_wrapping_folder_and_a_folder_of_zips(tmp_path):
    src = _tree(tmp_path / "src" / "flowers", TWO_SPLITS)
    direct = load_dataset("imagefolder", path=str(src))
    archive = tmp_path / "zips" / "flowers.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as z:
        for f in sorted(src.rglob("*.png")):
            z.write(f, f"flowers/{f.relative_to(src)}")
        z.writestr("__MACOSX/flowers/train/rose/._00.png", b"junk")
    zipped = load_dataset("imagefolder", path=str(archive))
    assert torch.equal(zipped.train.x, direct.train.x) and zipped.class_names == direct.class_names
    folder_of_zips = load_dataset("imagefolder", path=str(archive.parent))
    assert torch.equal(folder_of_zips.test.x, direct.test.x)
    # relative to the data root
    rel = load_dataset("imagefolder", path="zips/flowers.zip", root=str(tmp_path))
    assert torch.equal(rel.train.y, direct.train.y)


def test_decoded_once_then_read_from_the_cache(tmp_path, monkeypatch):
    src = _tree(tmp_path / "flowers", TWO_SPLITS)
    first = load_dataset("imagefolder", path=str(src))
    from fedhet.data import _imagefolder

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(_imagefolder, "decode_items", no_decoding)
    cached = load_dataset("imagefolder", path=str(src))
    assert torch.equal(cached.train.x, first.train.x)
    _image(7).save(src / "train" / "rose" / "02.png")  # a changed source is decoded again
    with pytest.raises(AssertionError, match="decoded again"):
        load_dataset("imagefolder", path=str(src))


def test_augment_pads_with_black(tmp_path):
    src = _tree(tmp_path / "flowers", TWO_SPLITS, size=(16, 16))
    b = load_dataset("imagefolder", path=str(src), augment=True)
    mean, std = b.info["normalization"]["mean"], b.info["normalization"]["std"]
    assert b.train_transform.padding == 2
    assert b.train_transform.fill == pytest.approx(tuple(-m / s for m, s in zip(mean, std)))


def test_channel_stats_by_hand():
    x = np.array([[[[0, 255]], [[51, 51]]]], dtype=np.uint8)  # (1, 2, 1, 2)
    mean, std = channel_stats(x)
    assert mean == pytest.approx((0.5, 0.2)) and std == pytest.approx((0.5, 1.0))


def _bad_sources(tmp_path: Path) -> list[tuple[dict, str]]:
    mixed = _tree(tmp_path / "mixed", TWO_SPLITS)
    _image(3, size=(7, 5)).save(mixed / "train" / "rose" / "09.png")
    empty = _tree(tmp_path / "empty", TWO_SPLITS)
    (empty / "train" / "lily").mkdir()
    broken = _tree(tmp_path / "broken", TWO_SPLITS)
    (broken / "test" / "rose" / "05.png").write_bytes(b"not a png")
    unseen = _tree(tmp_path / "unseen", {**TWO_SPLITS, "test": {"rose": [1], "daisy": [2]}})
    no_test = _tree(tmp_path / "no_test", {"train": TWO_SPLITS["train"]})
    stray = _tree(tmp_path / "stray", TWO_SPLITS)
    _tree(stray, {"": {"extra": [5]}})
    return [
        ({"path": str(mixed)}, r"09.png: image is 5x7, unlike .*00.png \(5x6\); set data.options.size"),
        ({"path": str(empty)}, "data.path: class folder train/lily holds no images"),
        ({"path": str(broken)}, r"05.png: not a readable image"),
        ({"path": str(unseen)}, "data.path: test class 'daisy' has no training images"),
        ({"path": str(no_test)}, "has no images in test/<class>/; it needs both train/ and test/"),
        ({"path": str(stray)}, "outside train/ and test/ while the source has those folders"),
        ({"path": str(tmp_path / "nowhere")}, "data.path: '.*nowhere' does not exist"),
        ({"path": str(tmp_path / "empty")} | {"test_fraction": 0.2}, "data.path: class folder"),
        ({"path": str(mixed), "size": "big"}, "data.size: got 'big', allowed: an integer"),
        ({"path": str(mixed), "channels": 2}, r"data.channels: got 2, allowed: 1 \(grayscale\), 3 \(RGB\) or auto"),
        ({}, "data.path: got None, allowed: a folder or .zip file"),
        ({"path": str(tmp_path / "no_images_here.txt")}, "does not exist"),
    ]


def test_bad_sources_say_which_file_or_field(tmp_path):
    for options, match in _bad_sources(tmp_path):
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            load_dataset("imagefolder", **options)
    two = _tree(tmp_path / "two", TWO_SPLITS)
    with pytest.raises(
        ValueError, match="data.test_fraction: got 0.3, allowed: nothing: the source has its own train/"
    ):
        load_dataset("imagefolder", path=str(two), test_fraction=0.3)
    with pytest.raises(TypeError, match="dataset 'imagefolder': unknown option 'colour'"):
        load_dataset("imagefolder", path=str(two), colour=True)


def test_png_bytes_in_memory_roundtrip():
    buf = io.BytesIO()
    _image(5).save(buf, format="PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).size == (5, 6)
