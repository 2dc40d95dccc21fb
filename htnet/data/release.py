"""Read and write the public HTNet release layout.

    combined_3_class2_for_optical_flow.csv   dataset,sub,filename_o,label,apex,imagename,sub_filename
    datasets/STSNet_whole_norm_u_v_os/<sub>_<filename_o> .png    (note the space before .png)
    landmarks_mtcnn.csv                       optional: five landmarks per sample (28x28 pixels)

The release also ships per-subject LOSO folders `three_norm_u_v_os/<subject>/u_train|u_test/<label>/`
holding copies of the same images; `load_release` reads those when the CSV is absent.

Pixels are kept as the reference uses them: cv2.imread (BGR channel order), float32 0..255.
"""
import io
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from htnet.errors import UserError
from htnet.io import SAFE_NAME_RULE, atomic_write, is_safe_name, path_under, read_text

CSV_NAME = "combined_3_class2_for_optical_flow.csv"
IMAGE_DIR = Path("datasets") / "STSNet_whole_norm_u_v_os"
LOSO_DIR = "three_norm_u_v_os"
LANDMARKS_NAME = "landmarks_mtcnn.csv"
CSV_COLUMNS = ["dataset", "sub", "filename_o", "label", "apex", "imagename", "sub_filename"]
REQUIRED_COLUMNS = ["dataset", "sub", "filename_o", "label"]
LANDMARK_POINTS = ["left_eye", "right_eye", "nose", "mouth_left", "mouth_right"]
LANDMARK_COLUMNS = [f"{p}_{axis}" for p in LANDMARK_POINTS for axis in ("x", "y")]
# The reference's fallback when MTCNN finds no face in the 28x28 apex image (x, y per point).
TEMPLATE_LANDMARKS = np.array(
    [[9.528073, 11.062551], [21.396168, 10.919773], [15.380184, 17.380562],
     [10.255435, 22.121233], [20.583706, 22.25584]], dtype=np.float32)
IMAGE_SHAPE = (28, 28, 3)
NUM_CLASSES = 3
# MTCNN puts some points a few pixels outside the face (the release has -6..29.3); the crop clamps
# them to 7..21. Anything further out than half an image is a broken landmarks file.
LANDMARK_MARGIN = 14
MAX_CSV_BYTES = 64 * 1024 * 1024  # the release's CSVs are tens of kB


@dataclass(frozen=True)
class CompositeData:
    images: np.ndarray     # (N, 3, 28, 28) float32, cv2.imread (BGR) channel order, 0..255
    labels: np.ndarray     # (N,) int64 in 0..2
    subjects: np.ndarray   # (N,) str, the LOSO subject id
    datasets: np.ndarray   # (N,) str, source dataset
    samples: np.ndarray    # (N,) str, '<sub>_<filename_o>'
    landmarks: np.ndarray  # (N, 5, 2) float32 x, y; the template where no face was detected
    source: str

    def __len__(self):
        return len(self.labels)

    @property
    def subject_ids(self):
        """Subjects in order of first appearance."""
        return list(dict.fromkeys(self.subjects.tolist()))

    def subset(self, mask):
        return CompositeData(self.images[mask], self.labels[mask], self.subjects[mask],
                             self.datasets[mask], self.samples[mask], self.landmarks[mask],
                             self.source)

    def restrict(self, subjects):
        unknown = sorted(set(subjects) - set(self.subjects.tolist()))
        if unknown:
            raise UserError(f"subject {unknown[0]!r} is not in the data from {self.source}")
        return self.subset(np.isin(self.subjects, list(subjects)))

    def pick_subjects(self, count):
        """`count` subjects taken in turn from each source dataset, in order of appearance."""
        by_dataset = {}
        for subject, dataset in dict(zip(self.subjects.tolist(), self.datasets.tolist())).items():
            by_dataset.setdefault(dataset, []).append(subject)
        queues, picked = list(by_dataset.values()), []
        while len(picked) < min(count, len(self.subject_ids)):
            for queue in queues:
                if queue and len(picked) < count:
                    picked.append(queue.pop(0))
        return picked

    def summary(self):
        table = pd.DataFrame({"dataset": self.datasets, "subject": self.subjects, "label": self.labels})
        counts = table.groupby("dataset").agg(samples=("label", "size"), subjects=("subject", "nunique"))
        for c in range(NUM_CLASSES):
            counts[f"class{c}"] = table[table.label == c].groupby("dataset").size()
        return counts.fillna(0).astype(int)


def sample_id(sub, filename_o):
    return f"{sub}_{filename_o}"


def image_path(root, sample):
    return Path(root) / IMAGE_DIR / f"{sample} .png"


def read_image(path):
    """One release image as (3, 28, 28) float32, BGR as cv2.imread gives it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"image missing: {path}")
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise UserError(f"image not decodable: {path}")
    if image.shape != IMAGE_SHAPE:
        raise UserError(f"image {path} has shape {image.shape}, expected {IMAGE_SHAPE} (28x28, 3 channels)")
    if image.dtype != np.uint8:  # a 16-bit PNG would give 0..65535 where the models expect 0..255
        raise UserError(f"image {path} has {image.dtype.itemsize * 8}-bit {image.dtype} pixels, expected 8-bit")
    return image.astype(np.float32).transpose(2, 0, 1)


def load_release(root, landmarks="auto", standardize=False, min_samples_per_subject=1):
    """Load the release at `root`.

    landmarks: "auto" (the release's landmarks_mtcnn.csv where present, else the template),
    "template", or the path of a landmarks CSV. standardize: per-channel zero mean / unit
    variance over the whole set instead of the reference's raw 0..255 values.
    min_samples_per_subject: reject subjects with fewer samples (the real release has 8 subjects
    with a single sample, so the default accepts them).
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data folder not found: {root}")
    if (root / CSV_NAME).is_file():
        table = _read_table(root / CSV_NAME)
        images = np.stack([read_image(image_path(root, s)) for s in table["sample"]])
    elif (root / LOSO_DIR).is_dir():
        table, images = _read_loso_folders(root / LOSO_DIR)
    else:
        raise UserError(f"{root} holds neither {CSV_NAME} nor {LOSO_DIR}/: not an HTNet release")
    sizes = table.groupby("sub").size()
    small = sizes[sizes < min_samples_per_subject]
    if len(small):
        raise UserError(f"{root}: subject {small.index[0]!r} has {small.iloc[0]} sample(s), "
                        f"fewer than min_samples_per_subject={min_samples_per_subject}")
    points = _read_landmarks(root, table["sample"], landmarks)
    _check_finite(root, table, images, "")
    if standardize:
        with np.errstate(all="ignore"):  # an overflow shows up as inf/NaN, checked below
            mean = images.mean(axis=(0, 2, 3), keepdims=True)
            std = images.std(axis=(0, 2, 3), keepdims=True) + 1e-6
            images = (images - mean) / std
        _check_finite(root, table, images, " after standardisation")
    return CompositeData(images.astype(np.float32), table["label"].to_numpy(np.int64),
                         table["sub"].to_numpy(str), table["dataset"].to_numpy(str),
                         table["sample"].to_numpy(str), points, str(root))


def read_csv(path):
    """A CSV as strings, cells as written (no 'NA' -> NaN): UTF-8 text, parsable, not empty."""
    text = read_text(path, max_bytes=MAX_CSV_BYTES)
    if not text.strip():
        raise UserError(f"{path}: empty file (expected a CSV with a header row)")
    try:
        return pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as e:
        raise UserError(f"{path}: not a readable CSV ({(str(e).splitlines() or [type(e).__name__])[0]})") from None


def check_names(path, table, columns, what):
    """Ids that become file names must be safe (see htnet.io.SAFE_NAME); row numbers count the header."""
    for column in columns:
        for row, value in enumerate(table[column]):
            if not is_safe_name(value):
                raise UserError(f"{path}: row {row + 2}: {what[column]} {value!r} is not a safe name ({SAFE_NAME_RULE})")


def _check_finite(root, table, images, when):
    bad = ~np.isfinite(images).all(axis=(1, 2, 3))
    if bad.any():
        raise UserError(f"{root}: sample {table['sample'].iloc[int(np.argmax(bad))]!r} has non-finite pixel values{when}")


def _read_table(csv_path):
    table = read_csv(csv_path)
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise UserError(f"{csv_path}: missing column {missing[0]!r}")
    if table.empty:
        raise UserError(f"{csv_path}: no samples")
    check_names(csv_path, table, ["sub", "filename_o"], {"sub": "subject id", "filename_o": "sample name"})
    labels = table["label"].str.strip()
    bad = table[~labels.isin([str(c) for c in range(NUM_CLASSES)])]  # '1.5', '1.0', '', 'x': refused
    if len(bad):
        row = bad.index[0]
        raise UserError(f"{csv_path}: row {row + 2}: label {str(table['label'][row])!r} is not one of 0, 1, 2")
    table["label"] = labels.astype(np.int64)
    table["dataset"] = table["dataset"].str.strip().str.lower()
    empty = table.index[table["dataset"] == ""]
    if len(empty):
        raise UserError(f"{csv_path}: row {empty[0] + 2}: empty dataset")
    table["sample"] = [sample_id(s, f) for s, f in zip(table["sub"], table["filename_o"])]
    duplicated = table["sample"][table["sample"].duplicated()]
    if len(duplicated):
        raise UserError(f"{csv_path}: duplicate sample id {duplicated.iloc[0]!r}")
    return table


def _read_loso_folders(loso_dir):
    """The release's per-subject folders: each subject's u_test/<label>/ holds its own samples."""
    rows, images, seen = [], [], {}
    for subject_dir in sorted(p for p in loso_dir.iterdir() if p.is_dir()):
        if not is_safe_name(subject_dir.name):
            raise UserError(f"{subject_dir}: subject id {subject_dir.name!r} is not a safe name ({SAFE_NAME_RULE})")
        for label_dir in sorted((subject_dir / "u_test").glob("*")):
            if label_dir.name not in [str(c) for c in range(NUM_CLASSES)]:
                raise UserError(f"{label_dir}: label folder {label_dir.name!r} is not one of 0, 1, 2")
            for png in sorted(label_dir.glob("*.png")):
                sample = png.name[: -len(".png")].rstrip()
                if not is_safe_name(sample):
                    raise UserError(f"{png}: sample name {sample!r} is not a safe name ({SAFE_NAME_RULE})")
                if sample in seen:  # the sample id keys the landmarks and the predictions
                    raise UserError(f"{png}: duplicate sample id {sample!r} (also {seen[sample]})")
                seen[sample] = png
                rows.append({"dataset": _guess_dataset(subject_dir.name), "sub": subject_dir.name,
                             "sample": sample, "label": int(label_dir.name)})
                images.append(read_image(png))
    if not rows:
        raise UserError(f"{loso_dir}: no images under <subject>/u_test/<label>/")
    return pd.DataFrame(rows), np.stack(images)


def _guess_dataset(subject):
    # The composite's subject ids: CASME II 'sub01', SMIC 's01', SAMM '006'.
    if subject.startswith("sub"):
        return "casme2"
    if subject.startswith("s"):
        return "smic"
    return "samm" if subject.isdigit() else "unknown"


def _read_landmarks(root, samples, landmarks):
    template = np.broadcast_to(TEMPLATE_LANDMARKS, (len(samples), 5, 2)).copy()
    if landmarks == "template":
        return template
    path = Path(root) / LANDMARKS_NAME if landmarks == "auto" else Path(landmarks)
    if landmarks == "auto" and not path.is_file():
        return template
    if not path.is_file():
        raise UserError(f"landmarks file not found: {path}")
    table = _landmark_table(path)
    absent = [s for s in samples if s not in table.index]
    if absent:
        raise UserError(f"{path}: no landmarks for sample {absent[0]!r}")
    rows = table.loc[list(samples)]
    detected = rows["detected"].to_numpy() == 1
    points = rows[LANDMARK_COLUMNS].to_numpy(np.float32).reshape(-1, 5, 2)
    broken = detected & ((points < -LANDMARK_MARGIN).any(axis=(1, 2))   # detected points are finite
                         | (points > IMAGE_SHAPE[0] + LANDMARK_MARGIN).any(axis=(1, 2)))
    if broken.any():
        i = int(np.argmax(broken))
        raise UserError(f"{path}: sample {samples.iloc[i]!r}: landmark {points[i].tolist()} is out of the 28x28 image")
    return np.where(detected[:, None, None], points, template).astype(np.float32)


def _landmark_table(path):
    """landmarks_mtcnn.csv indexed by sample, checked row by row: unique safe sample names, detected
    0 or 1, coordinates numbers (empty where undetected, as in the release), finite where detected."""
    table = read_csv(path)
    missing = [c for c in ["sample", "detected", *LANDMARK_COLUMNS] if c not in table.columns]
    if missing:
        raise UserError(f"{path}: missing column {missing[0]!r}")
    check_names(path, table, ["sample"], {"sample": "sample"})
    duplicated = table["sample"].duplicated(keep=False)
    if duplicated.any():
        rows = table.index[table["sample"] == table["sample"][duplicated].iloc[0]] + 2
        raise UserError(f"{path}: duplicate sample {table['sample'][rows[0] - 2]!r} (rows {', '.join(map(str, rows))})")
    detected = pd.to_numeric(table["detected"].str.strip(), errors="coerce")
    bad = table.index[~detected.isin([0, 1])]
    if len(bad):
        raise UserError(f"{path}: row {bad[0] + 2}: detected {table['detected'][bad[0]]!r} is not 0 or 1")
    table["detected"] = detected.astype(int)
    for column in LANDMARK_COLUMNS:
        text = table[column].str.strip()
        values = pd.to_numeric(text.where(text != "", "nan"), errors="coerce")
        bad = table.index[values.isna() & ~text.str.lower().isin(["", "nan"])]
        if len(bad):
            raise UserError(f"{path}: row {bad[0] + 2}: {column} {table[column][bad[0]]!r} is not a number")
        bad = table.index[(table["detected"] == 1) & ~np.isfinite(values.to_numpy(float))]
        if len(bad):
            raise UserError(f"{path}: row {bad[0] + 2}: sample {table['sample'][bad[0]]!r}: {column} "
                            f"{table[column][bad[0]]!r} is not a finite number (and detected is 1)")
        table[column] = values
    return table.set_index("sample")


def write_release(root, table, images, landmarks=None):
    """Write the release layout: the CSV, one PNG per sample and, optionally, landmarks.

    table: DataFrame with at least dataset, sub, filename_o, label (extra columns are kept, after
    the release's own). images: (N, 28, 28, 3) uint8 in cv2 (BGR) order. landmarks: a DataFrame in
    the landmarks_mtcnn.csv format, or None.
    """
    root = Path(root)
    table = table.copy()
    for column in CSV_COLUMNS:
        if column not in table.columns:
            table[column] = np.nan
    default_names = table["sub"].astype(str) + "_" + table["filename_o"].astype(str) + ".jpg"
    table["imagename"] = table["imagename"].astype(object).fillna(default_names)
    image_dir = root / IMAGE_DIR
    image_dir.mkdir(parents=True, exist_ok=True)
    for sub, filename_o, image in zip(table["sub"], table["filename_o"], images):
        ok, png = cv2.imencode(".png", np.ascontiguousarray(image, dtype=np.uint8))
        if not ok:
            raise UserError(f"could not encode image for sample {sample_id(sub, filename_o)!r}")
        with atomic_write(path_under(root, IMAGE_DIR, f"{sample_id(sub, filename_o)} .png"), "wb") as f:
            f.write(png.tobytes())
    if landmarks is not None:
        with atomic_write(root / LANDMARKS_NAME) as f:
            landmarks.to_csv(f, index=False)
    # The CSV comes last: a release folder with its CSV is complete (synthetic_cache relies on it).
    extra = [c for c in table.columns if c not in CSV_COLUMNS]
    with atomic_write(root / CSV_NAME) as f:
        table[CSV_COLUMNS + extra].to_csv(f, index=False)
