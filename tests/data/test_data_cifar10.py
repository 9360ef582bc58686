import io
import os
import pickle
import tarfile
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedhet.data import _cifar10
from fedhet.data.datasets import CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, cifar10, cifar10_arrays
from fedhet.data.transforms import RandomCropFlip

#: A real copy of CIFAR-10 for the one test that reads it (read before the fixture below clears it).
SHARED_DATA = os.environ.get("FEDHET_DATA")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    # Every test gets its own cache and no data folder from the environment.
    monkeypatch.setenv("FEDHET_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FEDHET_DATA", raising=False)


def _pixels(split: str, label: int, i: int) -> np.ndarray:
    """A flat 32x32 RGB image whose colour encodes (split, label, i)."""
    base = 20 * label + i + (5 if split == "test" else 0)
    return np.broadcast_to(np.array([base, 255 - base, 7 * label], dtype=np.uint8), (32, 32, 3)).copy()


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _expected(split: str) -> tuple[np.ndarray, np.ndarray]:
    """2 images per class, in label order: (uint8 NCHW, labels)."""
    x = np.stack([_pixels(split, c, i) for c in range(10) for i in range(2)]).transpose(0, 3, 1, 2)
    return x, np.repeat(np.arange(10), 2)


def _write_zips(folder: Path) -> list[Path]:
    """The shared layout: <folder>/cifar10_jpeg/{tiny_train,tiny_test}.zip with split/class/NNNN.png."""
    (folder / "cifar10_jpeg").mkdir(parents=True)
    paths = []
    for split in ("train", "test"):
        path = folder / "cifar10_jpeg" / f"tiny_{split}.zip"
        with zipfile.ZipFile(path, "w") as z:
            for c, name in enumerate(CIFAR10_CLASSES):
                for i in (1, 0):  # written out of order: loading sorts by label, then name
                    z.writestr(f"{split}/{name}/{i:04d}.png", _png(_pixels(split, c, i)))
        paths.append(path)
    return paths


def _write_folders(folder: Path) -> None:
    for split in ("train", "test"):
        for c, name in enumerate(CIFAR10_CLASSES):
            (folder / split / name).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(_pixels(split, c, i)).save(folder / split / name / f"{i:04d}.png")


def _batches() -> dict[str, dict]:
    out = {}
    for split, names in _cifar10.PICKLES.items():
        x, y = _expected(split)
        for k, name in enumerate(names):  # the 20 train images over 5 batches of 4
            sl = slice(4 * k, 4 * k + 4) if split == "train" else slice(None)
            out[name] = {b"data": x[sl].reshape(len(y[sl]), -1), b"labels": y[sl].tolist()}
    return out


def _assert_arrays(root, split="train"):
    x, y = cifar10_arrays(split, root=root, download=False)
    ex, ey = _expected(split)
    assert x.dtype == np.uint8 and x.shape == (20, 3, 32, 32) and y.dtype == np.int64
    assert np.array_equal(x, ex) and np.array_equal(y, ey)


def test_zips_of_class_folders_load_normalized_with_official_label_order(tmp_path):
    _write_zips(tmp_path)
    b = cifar10(root=str(tmp_path), download=False)
    assert b.train.x.shape == (20, 3, 32, 32) and b.test.x.shape == (20, 3, 32, 32)
    assert b.train.x.dtype == torch.float32 and b.train.y.dtype == torch.int64
    assert b.input_shape == (3, 32, 32) and b.num_classes == 10 and b.class_names == CIFAR10_CLASSES
    assert b.train.y.tolist() == np.repeat(np.arange(10), 2).tolist()
    # image 1 of 'bird' (label 2) in train is the colour (41, 214, 14)
    mean, std = torch.tensor(CIFAR10_MEAN), torch.tensor(CIFAR10_STD)
    expected = (torch.tensor([41.0, 214.0, 14.0]) / 255 - mean) / std
    assert torch.allclose(b.train.x[5, :, 7, 9], expected, atol=1e-6)
    _assert_arrays(tmp_path, "test")


def test_cache_is_written_reused_and_invalidated(tmp_path, monkeypatch):
    train_zip, _ = _write_zips(tmp_path / "data")
    first = cifar10(root=str(tmp_path / "data"), download=False)
    cached = sorted(p.name for p in (tmp_path / "cache" / "cifar10").glob("*/*.npy"))
    assert cached == ["test_x.npy", "test_y.npy", "train_x.npy", "train_y.npy"]
    assert not list((tmp_path / "cache").rglob("*.tmp"))

    def no_decoding(data, where):
        raise AssertionError(f"decoded {where} although the cache holds it")

    monkeypatch.setattr(_cifar10, "decode_image", no_decoding)
    second = cifar10(root=str(tmp_path / "data"), download=False)
    assert torch.equal(first.train.x, second.train.x) and torch.equal(first.test.y, second.test.y)

    # Replacing the source (new size and mtime) decodes again.
    monkeypatch.undo()
    monkeypatch.setenv("FEDHET_CACHE", str(tmp_path / "cache"))
    with zipfile.ZipFile(train_zip, "w") as z:
        for c, name in enumerate(CIFAR10_CLASSES):
            z.writestr(f"train/{name}/0000.png", _png(np.full((32, 32, 3), 200, np.uint8)))
    os.utime(train_zip, ns=(1, 1))
    third = cifar10(root=str(tmp_path / "data"), download=False)
    assert len(third.train) == 10 and len(third.test) == 20
    assert len(list((tmp_path / "cache" / "cifar10").iterdir())) == 2


def test_plain_folders_of_class_named_images(tmp_path):
    _write_folders(tmp_path)
    _assert_arrays(tmp_path, "train")
    _assert_arrays(tmp_path, "test")


def test_root_may_be_a_single_zip_with_a_top_folder(tmp_path):
    path = tmp_path / "cifar.zip"
    with zipfile.ZipFile(path, "w") as z:
        for split in ("train", "test"):
            for c, name in enumerate(CIFAR10_CLASSES):
                for i in range(2):
                    z.writestr(f"cifar/{split}/{name}/{i:04d}.png", _png(_pixels(split, c, i)))
        z.writestr("cifar/README.txt", "not an image")
    _assert_arrays(path, "train")
    _assert_arrays(path, "test")


def test_official_pickles_folder(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name, batch in _batches().items():
        (folder / name).write_bytes(pickle.dumps(batch))
    _assert_arrays(tmp_path, "train")
    _assert_arrays(tmp_path, "test")


def _write_tarball(path: Path) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, batch in _batches().items():
            data = pickle.dumps(batch)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_official_tarball_found_through_the_environment(tmp_path, monkeypatch):
    _write_tarball(tmp_path / "cifar-10-python.tar.gz")
    monkeypatch.setenv("FEDHET_DATA", str(tmp_path))
    _assert_arrays(None, "train")
    _assert_arrays(None, "test")


def test_root_resolution(tmp_path, monkeypatch):
    assert _cifar10.data_root(tmp_path / "x") == tmp_path / "x"
    monkeypatch.setenv("FEDHET_DATA", str(tmp_path / "env"))
    assert _cifar10.data_root() == tmp_path / "env"
    monkeypatch.delenv("FEDHET_DATA")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert _cifar10.data_root() == tmp_path / "home" / ".cache" / "fedhet" / "data"
    monkeypatch.delenv("FEDHET_CACHE")
    assert _cifar10.cache_root() == tmp_path / "home" / ".cache" / "fedhet"


def test_nothing_found_offline_says_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        cifar10(root=str(tmp_path), download=False)
    message = str(info.value)
    assert str(tmp_path / "cifar10_jpeg") in message
    assert "FEDHET_DATA" in message and "download=False" in message


def test_failed_download_is_reported(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(_cifar10.urllib.request, "urlopen", offline)
    with pytest.raises(FileNotFoundError, match=r"(?s)Looked in.*Downloading from https://www.cs.toronto.edu.* failed.*no network"):
        cifar10(root=str(tmp_path))
    assert list(tmp_path.iterdir()) == []  # no partial file left behind


def test_download_is_md5_checked_then_used(tmp_path, monkeypatch):
    _write_tarball(tmp_path / "served.tar.gz")
    served = (tmp_path / "served.tar.gz").read_bytes()
    monkeypatch.setattr(_cifar10.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(served))
    with pytest.raises(FileNotFoundError, match=r"md5 .*, expected c58f30108f718f92721af3b95e74349a"):
        cifar10(root=str(tmp_path / "data"))
    assert not (tmp_path / "data" / "cifar-10-python.tar.gz").exists()

    import hashlib

    monkeypatch.setattr(_cifar10, "MD5", hashlib.md5(served).hexdigest())
    b = cifar10(root=str(tmp_path / "data"))
    assert (tmp_path / "data" / "cifar-10-python.tar.gz").is_file()
    assert b.train.y.tolist() == np.repeat(np.arange(10), 2).tolist()


def test_unknown_class_folder_is_an_error(tmp_path):
    (tmp_path / "train" / "plane").mkdir(parents=True)
    (tmp_path / "test").mkdir()
    Image.fromarray(_pixels("train", 0, 0)).save(tmp_path / "train" / "plane" / "0.png")
    with pytest.raises(ValueError, match="class folder 'plane' is not a CIFAR-10 class"):
        cifar10_arrays("train", root=tmp_path, download=False)


def test_wrong_image_size_is_an_error(tmp_path):
    _write_folders(tmp_path)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "test" / "cat" / "0000.png")
    with pytest.raises(ValueError, match=r"0000.png: image is 16x16, CIFAR-10 images are 32x32"):
        cifar10_arrays("test", root=tmp_path, download=False)


def test_augment_sets_a_crop_flip_with_black_padding(tmp_path):
    _write_zips(tmp_path)
    assert cifar10(root=str(tmp_path), download=False).train_transform is None
    b = cifar10(root=str(tmp_path), download=False, augment=True)
    t = b.train_transform
    assert isinstance(t, RandomCropFlip) and t.padding == 4 and t.flip_prob == 0.5
    # a black pixel (0 before normalization) is what the border holds
    black = (torch.zeros(3) - torch.tensor(CIFAR10_MEAN)) / torch.tensor(CIFAR10_STD)
    assert torch.allclose(torch.tensor(t.fill), black)
    out = t(b.train.x, torch.Generator().manual_seed(0))
    assert out.shape == b.train.x.shape


def test_shared_copy_test_split(tmp_path):
    data = SHARED_DATA
    if not data:
        pytest.skip("FEDHET_DATA is not set; point it at a folder holding CIFAR-10 (e.g. /work/shared/data)")
    if _cifar10.find_source(Path(data)) is None:
        pytest.skip(f"FEDHET_DATA={data} holds no CIFAR-10 copy")
    x, y = cifar10_arrays("test", root=data, download=False)
    assert x.shape == (10000, 3, 32, 32) and x.dtype == np.uint8
    assert np.bincount(y, minlength=10).tolist() == [1000] * 10


def test_unrelated_zips_in_the_data_root_are_ignored(tmp_path):
    with zipfile.ZipFile(tmp_path / "glue.zip", "w") as z:
        z.writestr("train.tsv", "label\tsentence\n")
    with pytest.raises(FileNotFoundError, match="CIFAR-10 was not found"):
        cifar10_arrays("train", root=tmp_path, download=False)
    with zipfile.ZipFile(tmp_path / "CIFAR10-mini.zip", "w") as z:
        for split in ("train", "test"):
            for c, name in enumerate(CIFAR10_CLASSES):
                for i in range(2):
                    z.writestr(f"./{split}/{name}/{i:04d}.png", _png(_pixels(split, c, i)))
    _assert_arrays(tmp_path, "test")


def test_a_subset_of_the_classes_is_refused_with_a_pointer_to_imagefolder(tmp_path):
    _write_folders(tmp_path)
    import shutil

    shutil.rmtree(tmp_path / "train" / "truck")
    with pytest.raises(ValueError, match="has no train images of class 'truck'; .*use dataset: imagefolder"):
        cifar10_arrays("train", root=tmp_path, download=False)
