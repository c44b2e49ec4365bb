"""Labelled data matched to a model by class name (jobs/train/classes.py): the rules, the readers' labels
(ImageFolder, WebDataset, the built-in set), the training job's validation set and the calibration step's
refusal, on real Fashion-MNIST test images written as class folders."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import cfvit
from cfvit.data import FASHION_MNIST_CLASSES, load_fashion_mnist
from cfvit.official import imagenet_class_ids, imagenet_class_names
from jobs.calibrate import calibrate, validation_batches
from jobs.train.classes import ClassMismatch, match_classes, name_key
from jobs.train.config import ConfigError, load_config
from jobs.train.data import builtin_arrays, describe, folder_index
from jobs.train.driver import prepare
from jobs.train.preprocess import folder_rows, webdataset_rows

FMNIST = list(FASHION_MNIST_CLASSES)
FOLDER_NAMES = [c.replace("/", "_") for c in FMNIST]  # a folder cannot hold the "/" of "T-shirt/top"


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    """A saved, untrained cfvit_tiny_fmnist with the Fashion-MNIST class names (no training needed here)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("untrained") / "model"
    cfvit.save(cfvit.create_model("cfvit_tiny_fmnist", embed_dim=32, depth=2, num_heads=2), path, class_names=FMNIST)
    return path


def _folders(root, n: int, name_of) -> str:
    """The first `n` Fashion-MNIST test images as PNGs in class folders named `name_of(label)`."""
    x, y = load_fashion_mnist("test")
    for i in range(n):
        d = root / name_of(int(y[i]))
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i]).save(d / f"{i:05d}.png")
    return str(root)


# ------------------------------------------------------------------ the rules
def test_same_names_same_order_is_the_identity():
    m = match_classes(FMNIST, FMNIST, 10)
    assert m.identity and m.how == "same names, same order"


def test_sorted_folders_are_matched_by_name_not_position():
    folders = sorted(FOLDER_NAMES)  # ImageFolder's order: 'Ankle boot', 'Bag', 'Coat', …, 'T-shirt_top', 'Trouser'
    m = match_classes(folders, FMNIST, 10)
    assert [FMNIST[i] for i in m.labels] == [c.replace("_", "/") if c == "T-shirt_top" else c for c in folders]
    assert not m.identity and "'T-shirt_top' → 'T-shirt/top'" in m.how


@pytest.mark.parametrize("folder", ["T-shirt_top", "t-shirt top", "TSHIRT-TOP", "T-shirt/top", "T‐shirt_top"])
def test_case_spaces_and_punctuation_are_ignored(folder):
    assert name_key(folder) == name_key("T-shirt/top") == "tshirttop"
    assert match_classes([folder], FMNIST, 10).labels == (0,)


def test_numbered_folders():
    numbered = [f"{i:02d}" for i in range(10)]
    assert match_classes(numbered, [str(i) for i in range(10)], 10).identity  # "00" is class "0"
    assert match_classes(numbered, None, 10).how == "numbers as class indices"  # a model without names
    # a model whose names are words: the numbers are its class indices, in its order
    m = match_classes(["09", "00"], FMNIST, 10)
    assert m.labels == (9, 0) and m.how == "numbers as class indices"
    # numbered classes matched by value, whatever order the folders sort in (strings: "10" before "2")
    assert match_classes(["1", "10", "2"], [str(i) for i in range(11)], 11).labels == (1, 10, 2)


def test_a_validation_set_may_hold_some_of_the_classes():
    assert match_classes(["Bag", "Trouser"], FMNIST, 10).labels == (8, 1)


def test_a_model_without_names_keeps_the_data_order_and_says_so():
    m = match_classes(["cat", "dog"], None, 2)
    assert m.identity and "model names no classes" in m.how
    with pytest.raises(ClassMismatch, match="no names \\(3 classes\\)"):
        match_classes(["cat", "dog"], None, 3)


@pytest.mark.parametrize("data, why", [
    (FOLDER_NAMES[:9] + ["Boot"], "no model class for 'Boot'"),
    (["T-shirt_top", "t-shirt top"], "one model class for 'T-shirt_top' and 't-shirt top'"),
    ([f"{i:02d}" for i in range(11)], "no model class for '10'"),
])
def test_a_mismatch_is_refused_with_both_lists(data, why):
    with pytest.raises(ClassMismatch) as e:
        match_classes(data, FMNIST, 10, data_name="/data/val")
    msg = str(e.value)
    assert why in msg and "/data/val has [" in msg and "'Ankle boot'" in msg and "'T-shirt/top'" in msg


def test_model_names_alike_but_for_punctuation_are_not_guessed():
    with pytest.raises(ClassMismatch):
        match_classes(["ab"], ["a-b", "a_b"], 2)


def test_long_lists_are_shortened_in_the_message():
    model = [f"n{i:08d}" for i in range(1000)]
    with pytest.raises(ClassMismatch, match=r"… \(1000 in all\)"):
        match_classes(["nothing"], model, 1000)


# ------------------------------------------------------------------ the readers' labels
def test_imagefolder_rows_carry_the_model_index(tmp_path):
    root = _folders(tmp_path / "val", 40, lambda y: FOLDER_NAMES[y])
    src = describe(root).matched_to(FMNIST, 10)
    index = folder_index(src)
    assert {c: FMNIST[i] for c, i in index.items()}["T-shirt_top"] == "T-shirt/top"
    paths = [f"{root}/{c}/x.png" for c in ("Bag", "T-shirt_top", "Trouser")] + [f"{root}/stray/x.png"]
    rows = folder_rows(pd.DataFrame({"path": paths, "bytes": [b""] * 4}), index)
    assert rows["label"].tolist() == [8, 0, 1, -1]


def test_webdataset_rows_map_classes_json_positions():
    df = pd.DataFrame({"png": [b"a", b"b", b"c", b"d"], "cls": [b"0", b"2", b"7", b"x"]})
    assert webdataset_rows(df)["label"].tolist() == [0, 2, 7, -1]  # no map: as the shards say
    assert webdataset_rows(df, labels=(9, 8, 7))["label"].tolist() == [9, 7, -1, -1]  # 7: no such class


def test_builtin_labels_follow_a_model_trained_on_other_names():
    folders_model = sorted(FOLDER_NAMES)  # a model trained on the folders: names in their sorted order
    src = describe("fashion-mnist:test").matched_to(folders_model, 10)
    _, own = load_fashion_mnist("test")
    _, mapped = builtin_arrays(src, "val", 50)
    assert [folders_model[i] for i in mapped] == [FOLDER_NAMES[i] for i in own[:50]]


# ------------------------------------------------------------------ the training job's validation set
def test_training_validation_folders_are_matched_to_the_training_classes(tmp_path):
    val = _folders(tmp_path / "val", 30, lambda y: FOLDER_NAMES[y])
    cfg = load_config("fmnist_tiny", [f"data.val={val}"])
    prep = prepare(cfg)
    assert prep.classes == FMNIST and prep.val_src.labels is not None
    assert [FMNIST[i] for i in prep.val_src.labels] == [c.replace("T-shirt_top", "T-shirt/top")
                                                        for c in sorted(FOLDER_NAMES)]


def test_training_refuses_a_validation_set_of_other_classes(tmp_path):
    val = _folders(tmp_path / "val", 30, lambda y: f"class{y}")
    with pytest.raises(ConfigError, match=r"data\.val: the classes of .* do not match data\.train's.*'class0'.*"
                                          r"'T-shirt/top'"):
        prepare(load_config("fmnist_tiny", [f"data.val={val}"]))


# ------------------------------------------------------------------ calibration
def test_builtin_validation_labels_follow_the_model_names():
    """Labels of the built-in set for a model trained on class folders (its names in their sorted order)
    follow its names, not the set's own order."""
    model = cfvit.create_model("cfvit_tiny_fmnist")
    x, y = map(np.concatenate, zip(*validation_batches("fashion-mnist:test", model.data_config, 10,
                                                       class_names=FMNIST, limit=200)))
    folders_order = sorted(FOLDER_NAMES)
    _, y2 = map(np.concatenate, zip(*validation_batches("fashion-mnist:test", model.data_config, 10,
                                                        class_names=folders_order, limit=200)))
    assert [folders_order[j] for j in y2] == [FOLDER_NAMES[i] for i in y]
    assert not np.array_equal(y2, y)


def test_calibrate_refuses_data_of_other_classes(untrained, tmp_path):
    data = _folders(tmp_path / "val", 20, lambda y: f"c{y}")
    with pytest.raises(ClassMismatch, match=r"'c0'.*'T-shirt/top'"):  # before Ray starts or an image is read
        calibrate(str(untrained), "60%", data=data, limit=20, write=False)


def test_calibration_summary_says_how_classes_matched(untrained):
    cal = calibrate(str(untrained), "60%", data="fashion-mnist:test", limit=64, write=False)
    summary = json.loads(json.dumps(cal.summary(), default=str))
    assert summary["data"]["matched"] == "same names, same order" and summary["data"]["labels"] is None



def test_imagenet_style_folders_are_matched_by_their_wordnet_ids(tmp_path):
    """An imported ImageNet model names its classes in words ("tabby, tabby cat") and carries the WordNet IDs
    its validation folders are named after: a subset of the 1000 folders, in sorted order, gets each folder's
    own index among the 1000 (by id, not by sorted position); a folder the model does not know is refused."""
    ids, names = imagenet_class_ids(), imagenet_class_names()
    folders = sorted([ids[281], ids[0], ids[999], ids[430]])
    m = match_classes(folders, names, 1000, class_ids=ids)
    assert m.how == "by class id" and [names[i] for i in m.labels] == [names[ids.index(f)] for f in folders]
    for wnid in (ids[0], ids[281]):
        (tmp_path / wnid).mkdir()
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / wnid / "a.png")
    src = describe(str(tmp_path)).matched_to(names, 1000, class_ids=ids)
    assert [src.label_of(i) for i in range(2)] == [0, 281] and src.matched == "by class id"
    with pytest.raises(ClassMismatch, match="n99999999"):
        match_classes([ids[0], "n99999999"], names, 1000, class_ids=ids)
