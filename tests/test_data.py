import numpy as np
import pytest
from PIL import Image

from sensplan import DataSpecError
from sensplan.sensitivity import DataSpec, Preprocess, load_eval_set, stratified_indices
from sensplan.sensitivity._data import load_calibration_set, train_loader


def _image_folder(root, classes=("cat", "dog", "emu"), per_class=(5, 7, 4), size=(10, 12)):
    rng = np.random.default_rng(0)
    for c, n in zip(classes, per_class, strict=True):
        (root / c).mkdir(parents=True)
        for i in range(n):
            arr = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{i:04d}.png")
    return root


def test_stratified_sample_keeps_class_proportions():
    labels = np.repeat(np.arange(10), 1000)  # sorted by class, like any ImageFolder tree
    idx = stratified_indices(labels, 1000, seed=0)
    assert len(set(idx)) == 1000
    assert np.bincount(labels[idx]).tolist() == [100] * 10
    assert not np.array_equal(idx, stratified_indices(labels, 1000, seed=1))
    assert np.array_equal(idx, stratified_indices(labels, 1000, seed=0))


def test_stratified_sample_of_uneven_classes_sums_exactly():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
    idx = stratified_indices(labels, 11, seed=3)
    assert len(idx) == 11 and np.bincount(labels[idx]).tolist() == [6, 3, 2]


def test_a_class_whose_share_is_below_one_sample_can_get_none():
    labels = np.repeat(np.arange(10), 7)
    idx = stratified_indices(labels, 5, seed=0)
    assert len(idx) == len(set(idx)) == 5
    assert np.bincount(labels[idx], minlength=10).max() == 1
    assert len(stratified_indices(labels, None, seed=0)) == 70


def test_image_folder_loads_with_preprocessing(tmp_path):
    root = _image_folder(tmp_path / "imgs")
    ev = load_eval_set(DataSpec.parse(str(root), Preprocess(resize=8, crop=8)), n=9, seed=0)
    assert ev.x.shape == (9, 3, 8, 8)
    assert ev.classes == ["cat", "dog", "emu"]
    assert ev.description["per_class"] == [3, 4, 2]
    assert ev.description["n_available"] == 16


def test_hidden_folders_are_not_classes_and_their_images_are_not_loaded(tmp_path):
    root = _image_folder(tmp_path / "imgs")
    _image_folder(root / ".ipynb_checkpoints", classes=("x",), per_class=(2,))
    _image_folder(root / "cat" / ".ipynb_checkpoints", classes=("y",), per_class=(2,))  # inside a class
    ev = load_eval_set(DataSpec.parse(str(root)), n=None, seed=0)
    assert ev.classes == ["cat", "dog", "emu"] and len(ev.y) == 16


def test_images_of_different_sizes_ask_for_resize(tmp_path):
    root = _image_folder(tmp_path / "a", classes=("x",), per_class=(2,), size=(10, 12))
    _image_folder(tmp_path / "b", classes=("y",), per_class=(2,), size=(8, 8))
    (root / "y").symlink_to(tmp_path / "b" / "y")
    with pytest.raises(DataSpecError, match="--crop N to cut them to one size"):
        load_eval_set(DataSpec.parse(str(root)), n=None)


def test_digits_is_offline_and_split_without_overlap():
    test = load_eval_set(DataSpec.parse("digits"), None)
    train = load_eval_set(DataSpec.parse("digits:train"), None)
    assert len(test) == 540 and len(train) == 1257 and test.x.shape[1:] == (1, 8, 8)
    assert not (set(map(bytes, test.x.numpy())) & set(map(bytes, train.x.numpy())))


def test_calibration_sample_is_disjoint_from_the_evaluation_sample(tmp_path):
    root = _image_folder(tmp_path / "imgs", per_class=(10, 10, 10), size=(6, 6))
    ev = load_eval_set(DataSpec.parse(str(root)), n=12, seed=0)
    cal = load_calibration_set(ev, 9, 0)
    assert not set(ev.indices) & set(cal.indices)
    assert "disjoint" in cal.description["role"]


def test_train_loader_is_seeded():
    a = [y.tolist() for _, y in train_loader(DataSpec.parse("digits:train"), 100, seed=4)]
    b = [y.tolist() for _, y in train_loader(DataSpec.parse("digits:train"), 100, seed=4)]
    c = [y.tolist() for _, y in train_loader(DataSpec.parse("digits:train"), 100, seed=5)]
    assert a == b and a != c
    assert sum(len(y) for y in a) == 1257


def test_eval_set_moves_to_a_device_and_stays_put_when_there():
    ev = load_eval_set(DataSpec.parse("digits"), 20, seed=0)
    assert ev.to("cpu") is ev
    moved = ev.to("meta")  # a device that holds shapes only: the data is copied, not shared
    assert moved.x.device.type == moved.y.device.type == "meta"
    assert moved.x.shape == ev.x.shape and moved.description == ev.description
    assert np.array_equal(moved.indices, ev.indices) and ev.x.device.type == "cpu"


@pytest.mark.parametrize("spec,fragment", [
    ("nowhere/at/all", "neither an existing directory"),
    ("digits:validation", "must be 'train' or 'test'"),
    ("cifar10:/nonexistent", "cifar-10-batches-py"),
    ("imagefolder:/nonexistent", "does not exist"),
])
def test_bad_data_specs_are_explained(spec, fragment):
    with pytest.raises(DataSpecError) as e:
        load_eval_set(DataSpec.parse(spec), 10)
    assert fragment in str(e.value)


def test_bad_preprocessing_is_explained():
    with pytest.raises(DataSpecError, match="both mean and std"):
        Preprocess(mean=(0.5,))
    with pytest.raises(DataSpecError, match="positive integer"):
        Preprocess(resize=0)


def test_a_crop_larger_than_the_images_is_refused_also_when_workers_decode(tmp_path):
    root = _image_folder(tmp_path / "imgs", classes=("a", "b"), per_class=(300, 300), size=(8, 8))
    with pytest.raises(DataSpecError, match=r"--crop 16 is larger than an image \(8x8\)"):
        load_eval_set(DataSpec.parse(str(root), Preprocess(crop=16)), n=None, workers=2)  # 600 >= 512: workers
    ev = load_eval_set(DataSpec.parse(str(root), Preprocess(resize=16, crop=16)), n=20)
    assert ev.x.shape[1:] == (3, 16, 16)
