import shutil

import cv2
import numpy as np
import pandas as pd
import pytest

from htnet.data import htnet_input, load_release, make_synthetic
from htnet.data.crops import patch_centres
from htnet.data.release import CSV_NAME, TEMPLATE_LANDMARKS, image_path
from htnet.errors import UserError
from release_edits import RELEASE_CASES

REAL_COUNTS = {  # from the release's README: samples, subjects, class 0/1/2
    "casme2": (145, 24, 88, 32, 25), "smic": (164, 16, 70, 51, 43), "samm": (133, 28, 92, 26, 15)}


def test_real_release_loads_with_readme_counts(real_root):
    data = load_release(real_root)
    assert len(data) == 442 and len(data.subject_ids) == 68
    assert data.images.shape == (442, 3, 28, 28) and data.images.dtype == np.float32
    assert 0 <= data.images.min() and data.images.max() <= 255
    summary = data.summary()
    for dataset, counts in REAL_COUNTS.items():
        assert tuple(summary.loc[dataset]) == counts
    # pixels are cv2.imread's, BGR and unscaled
    first = cv2.imread(str(image_path(real_root, data.samples[0])))
    np.testing.assert_array_equal(data.images[0], first.transpose(2, 0, 1).astype(np.float32))


def test_real_landmarks_detected_and_template(real_root):
    data = load_release(real_root)
    table = pd.read_csv(real_root / "landmarks_mtcnn.csv", dtype={"sample": str}).set_index("sample")
    detected = table[table.detected == 1].index[0]
    undetected = table[table.detected == 0].index[0]
    i, j = list(data.samples).index(detected), list(data.samples).index(undetected)
    np.testing.assert_allclose(data.landmarks[i].ravel(), table.loc[detected].iloc[1:].to_numpy(float), rtol=1e-6)
    np.testing.assert_allclose(data.landmarks[j], TEMPLATE_LANDMARKS)
    assert (table.detected == 0).sum() == 172


def coordinate_image():
    """Channel 0 holds the row index, channel 1 the column index."""
    rows, cols = np.mgrid[0:28, 0:28].astype(np.float32)
    return np.stack([rows, cols, rows * 28 + cols])[None]


def test_crops_reference_uses_x_as_row_and_corrected_uses_x_as_column():
    image = coordinate_image()
    points = np.array([[[9.9, 12.2], [20.5, 11.0], [15, 17], [10.0, 22.7], [19.2, 20.1]]], np.float32)
    reference = htnet_input(image, points, "reference")[0]
    corrected = htnet_input(image, points, "corrected")[0]
    # tiles: (top-left, top-right, bottom-left, bottom-right) = points 0, 1, 3, 4; truncated ints
    centres = [(9, 12), (20, 11), (10, 21), (19, 20)]  # 22.7 clamps to 21
    tiles = [(0, 0), (0, 14), (14, 0), (14, 14)]
    for (x, y), (r0, c0) in zip(centres, tiles):
        ref_tile, cor_tile = reference[:, r0:r0 + 14, c0:c0 + 14], corrected[:, r0:r0 + 14, c0:c0 + 14]
        assert ref_tile[0, 0, 0] == x - 7 and ref_tile[1, 0, 0] == y - 7       # x indexes rows
        assert cor_tile[0, 0, 0] == y - 7 and cor_tile[1, 0, 0] == x - 7       # x indexes columns
        assert ref_tile[0, 13, 0] == x + 6 and cor_tile[1, 0, 13] == x + 6


def test_crop_centres_clamped_to_7_21_and_truncated():
    points = np.array([[[2.0, 30.0], [7.9, 21.9], [15, 15], [-3, 6.99], [21.5, 14.999]]], np.float32)
    assert patch_centres(points)[0].tolist() == [[7, 21], [7, 21], [15, 15], [7, 7], [21, 14]]
    out = htnet_input(coordinate_image(), points, "reference")
    assert out.shape == (1, 3, 28, 28)


def test_synthetic_is_deterministic_per_seed(tmp_path):
    a = load_release(make_synthetic(tmp_path / "a", 2, seed=5))
    b = load_release(make_synthetic(tmp_path / "b", 2, seed=5))
    c = load_release(make_synthetic(tmp_path / "c", 2, seed=6))
    np.testing.assert_array_equal(a.images, b.images)
    assert (a.labels == b.labels).all() and (a.samples == b.samples).all()
    assert not np.array_equal(a.images, c.images)
    assert set(a.datasets) == {"casme2", "smic", "samm"} and len(a.subject_ids) == 6
    assert set(a.labels.tolist()) == {0, 1, 2}


def test_loso_folder_layout_is_read_like_the_csv(synth_root, tmp_path):
    data = load_release(synth_root)
    loso = tmp_path / "release" / "three_norm_u_v_os"
    for sample, subject, label in zip(data.samples, data.subjects, data.labels):
        folder = loso / subject / "u_test" / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(image_path(synth_root, sample), folder / f"{sample} .png")
    from_folders = load_release(tmp_path / "release", landmarks="template")
    order = np.argsort(from_folders.samples)
    reference = np.argsort(data.samples)
    assert (from_folders.samples[order] == data.samples[reference]).all()
    np.testing.assert_array_equal(from_folders.images[order], data.images[reference])
    assert (from_folders.labels[order] == data.labels[reference]).all()
    assert (from_folders.datasets[order] == data.datasets[reference]).all()


@pytest.mark.parametrize("case", list(RELEASE_CASES))
def test_bad_release_gives_one_line_naming_the_problem(release, case):
    breakage, options, message = RELEASE_CASES[case]
    breakage(release)
    with pytest.raises(UserError) as error:
        load_release(release, **options)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_template_landmarks_need_no_landmarks_file(release):
    (release / "landmarks_mtcnn.csv").write_text("garbage\n")
    assert load_release(release, landmarks="template").landmarks.shape[1:] == (5, 2)


def test_subject_with_one_sample_is_accepted_unless_a_minimum_is_asked(release):
    table = pd.read_csv(release / CSV_NAME, dtype=str)
    lonely = table["sub"].iloc[0]
    table[(table["sub"] != lonely) | (table.index == 0)].to_csv(release / CSV_NAME, index=False)
    assert (load_release(release).subjects == lonely).sum() == 1
    with pytest.raises(UserError, match=f"subject '{lonely}' has 1 sample"):
        load_release(release, min_samples_per_subject=2)
