"""Ways to break a copy of a release folder (the `release` fixture), one RELEASE_CASES for every test of a broken
release: test_data.py checks each where it is raised (load_release), test_bad_input.py a few through each command."""
import shutil

import cv2
import numpy as np
import pandas as pd

from htnet.data.release import CSV_NAME, IMAGE_DIR, LANDMARKS_NAME


def edit_csv(root, change):
    table = pd.read_csv(root / CSV_NAME, dtype=str)
    change(table)
    table.to_csv(root / CSV_NAME, index=False)


def drop_label_column(root):
    edit_csv(root, lambda t: t.pop("label"))


def set_label(row, value):
    """The CSV's row `row` + 2 (the header is row 1) gets label `value`."""
    return lambda root: edit_csv(root, lambda t: t.__setitem__("label", t["label"].where(t.index != row, value)))


def duplicate_sample(root):
    """The second row becomes a copy of the first row's sample id."""
    def change(table):
        table.loc[1, ["sub", "filename_o"]] = table.loc[0, ["sub", "filename_o"]].to_numpy()
    edit_csv(root, change)


def first_png(root):
    return sorted((root / IMAGE_DIR).glob("*.png"))[0]


def write_png(image):
    def write(root):
        assert cv2.imwrite(str(first_png(root)), image)
    return write


def one_sample_subject(root):
    table = pd.read_csv(root / CSV_NAME, dtype=str)
    table.drop(table.index[table["sub"] == "008"][1:]).to_csv(root / CSV_NAME, index=False)


def fold_lacks_class(root):
    # surprise (2) only in subject sub01: the fold that tests sub01 cannot learn it
    edit_csv(root, lambda t: t.__setitem__("label", t["label"].where((t["label"] != "2") | (t["sub"] == "sub01"), "0")))


def landmarks_missing_sample(root):
    table = pd.read_csv(root / LANDMARKS_NAME, dtype={"sample": str})
    table.iloc[1:].to_csv(root / LANDMARKS_NAME, index=False)


def landmark_out_of_image(root):
    table = pd.read_csv(root / LANDMARKS_NAME, dtype={"sample": str})
    table.loc[table.index[table.detected == 1][0], "mouth_left_y"] = -40.0
    table.to_csv(root / LANDMARKS_NAME, index=False)


def replace_csv(data):
    return lambda root: (root / CSV_NAME).write_bytes(data(root) if callable(data) else data)


# name: (breakage, load_release's options, the error's text)
RELEASE_CASES = {
    "data folder missing": (shutil.rmtree, {}, "data folder not found"),
    "missing column": (drop_label_column, {}, f"{CSV_NAME}: missing column 'label'"),
    "label twice": (replace_csv(lambda r: (r / CSV_NAME).read_bytes().replace(b"label,", b"label,label,", 1)), {},
                    f"{CSV_NAME}: column 'label' appears twice in the header"),
    "label 7": (set_label(3, "7"), {}, "row 5: label '7' is not one of 0, 1, 2"),
    "label 1.5": (set_label(3, "1.5"), {}, "row 5: label '1.5' is not one of 0, 1, 2"),
    "label 1.0": (set_label(0, "1.0"), {}, "row 2: label '1.0' is not one of 0, 1, 2"),
    "label empty": (set_label(0, ""), {}, "row 2: label '' is not one of 0, 1, 2"),
    "latin-1 text": (replace_csv(lambda r: (r / CSV_NAME).read_bytes().replace(b"syn02", b"syn\xe92", 1)), {},
                     f"{CSV_NAME}: not UTF-8 text (byte 0xe9 at offset"),
    "binary": (replace_csv(lambda r: first_png(r).read_bytes()), {}, f"{CSV_NAME}: not UTF-8 text (byte 0x89 at offset 0)"),
    "empty file": (replace_csv(b""), {}, f"{CSV_NAME}: empty file"),
    "header only": (replace_csv(b"dataset,sub,filename_o,label\n"), {}, f"{CSV_NAME}: no samples"),
    "duplicate sample id": (duplicate_sample, {}, "duplicate sample id 'sub01_syn01'"),
    "listed image missing": (lambda root: first_png(root).unlink(), {}, "image missing: "),
    "image not decodable": (lambda root: first_png(root).write_bytes(b"\x89PNG broken"), {}, "image not decodable: "),
    "wrong image size": (write_png(np.zeros((32, 28, 3), np.uint8)), {}, "has shape (32, 28, 3), expected (28, 28, 3)"),
    "4-channel PNG": (write_png(np.zeros((28, 28, 4), np.uint8)), {}, "has shape (28, 28, 4), expected (28, 28, 3)"),
    "grayscale PNG": (write_png(np.zeros((28, 28), np.uint8)), {}, "has shape (28, 28), expected (28, 28, 3)"),
    "16-bit PNG": (write_png(np.full((28, 28, 3), 40000, np.uint16)), {}, "has 16-bit uint16 pixels, expected 8-bit"),
    "subject with one sample (minimum asked)": (one_sample_subject, {"min_samples_per_subject": 2},
                                                "subject '008' has 1 sample(s), fewer than min_samples_per_subject=2"),
    "landmarks miss a sample": (landmarks_missing_sample, {}, f"{LANDMARKS_NAME}: no landmarks for sample 'sub01_syn01'"),
    "landmark out of the image": (landmark_out_of_image, {}, "is out of the 28x28 image"),
}
