"""Read and write the public HTNet release layout (docs/design.md); pixels as the reference uses them:
cv2.imread (BGR channel order), float32 0..255."""
import hashlib
import io
import itertools
from dataclasses import dataclass, fields
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from htnet.errors import UserError, first_line
from htnet.io import SAFE_NAME_RULE, atomic_write, decode_text, is_safe_name, path_under, read_bytes

CSV_NAME = "combined_3_class2_for_optical_flow.csv"
IMAGE_DIR = Path("datasets") / "STSNet_whole_norm_u_v_os"
LOSO_DIR = "three_norm_u_v_os"  # per-subject copies of the images, read when the CSV is absent
LANDMARKS_NAME = "landmarks_mtcnn.csv"
CSV_COLUMNS = ["dataset", "sub", "filename_o", "label", "apex", "imagename", "sub_filename"]
REQUIRED_COLUMNS = ["dataset", "sub", "filename_o", "label"]
LANDMARK_COLUMNS = [f"{p}_{axis}" for p in ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")
                    for axis in ("x", "y")]
# The reference's fallback when MTCNN finds no face in the 28x28 apex image (x, y per point).
TEMPLATE_LANDMARKS = np.array(
    [[9.528073, 11.062551], [21.396168, 10.919773], [15.380184, 17.380562],
     [10.255435, 22.121233], [20.583706, 22.25584]], dtype=np.float32)
IMAGE_SHAPE = (28, 28, 3)
NUM_CLASSES = 3
CLASSES = [str(c) for c in range(NUM_CLASSES)]
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

    def restrict(self, subjects):
        """The samples of these subjects."""
        unknown = sorted(set(subjects) - set(self.subjects.tolist()))
        if unknown:
            raise UserError(f"subject {unknown[0]!r} is not in the data from {self.source}")
        mask = np.isin(self.subjects, list(subjects))
        return CompositeData(*(getattr(self, f.name)[mask] for f in fields(self)[:-1]), self.source)

    def pick_subjects(self, count):
        """`count` subjects taken in turn from each source dataset, in order of appearance."""
        by_dataset = {}
        for subject, dataset in dict(zip(self.subjects.tolist(), self.datasets.tolist())).items():
            by_dataset.setdefault(dataset, []).append(subject)
        turns = itertools.zip_longest(*by_dataset.values())
        return [subject for turn in turns for subject in turn if subject is not None][:count]

    def fingerprint(self):
        """A hash of everything a run reads (pixels, labels, ids, landmarks): records of other data differ."""
        arrays = [np.ascontiguousarray(getattr(self, f.name)) for f in fields(self)[:-1]]
        return hashlib.sha256(b"".join(f"{a.dtype}{a.shape}".encode() + a.tobytes() for a in arrays)).hexdigest()[:16]

    def summary(self):
        """Samples, subjects and class counts per dataset."""
        table = pd.DataFrame({"dataset": self.datasets, "subject": self.subjects, "label": self.labels})
        counts = table.groupby("dataset").agg(samples=("label", "size"), subjects=("subject", "nunique"))
        classes = pd.crosstab(table["dataset"], table["label"]).reindex(columns=range(NUM_CLASSES), fill_value=0)
        return counts.join(classes.add_prefix("class")).astype(int)


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
    """The release at `root` (its CSV, else its per-subject folders) as CompositeData. landmarks: "auto"
    (landmarks_mtcnn.csv where present, else the template), "template" or a CSV path; standardize:
    per-channel zero mean, unit variance; min_samples_per_subject: reject smaller subjects."""
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
            images = (images - images.mean(axis=(0, 2, 3), keepdims=True)) / (
                images.std(axis=(0, 2, 3), keepdims=True) + 1e-6)
        _check_finite(root, table, images, " after standardisation")
    return CompositeData(images.astype(np.float32), table["label"].to_numpy(np.int64),
                         table["sub"].to_numpy(str), table["dataset"].to_numpy(str),
                         table["sample"].to_numpy(str), points, str(root))


def read_csv(path, required=(), strip=False):
    """A CSV as strings, cells as written (no 'NA' -> NaN), with the `required` columns; strip: names
    and cells stripped of spaces."""
    text = decode_text(read_bytes(path, max_bytes=MAX_CSV_BYTES), path)
    if not text.strip():
        raise UserError(f"{path}: empty file (expected a CSV with a header row)")
    try:
        header = pd.read_csv(io.StringIO(text), header=None, nrows=1, dtype=str, keep_default_na=False).iloc[0]
        table = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as e:
        raise UserError(f"{path}: not a readable CSV ({first_line(e)})") from None
    header = header.str.strip() if strip else header
    if header.duplicated().any():  # pandas would rename the second to <name>.1
        raise UserError(f"{path}: column {header[header.duplicated()].iloc[0]!r} appears twice in the header")
    if strip:
        table = table.rename(columns=lambda c: str(c).strip()).apply(lambda column: column.str.strip())
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise UserError(f"{path}: missing column {missing[0]!r} (required: {', '.join(required)})")
    return table


def check_rows(path, table, checks):
    """checks: (bad row mask, message(row)) pairs in order; the first that holds anywhere raises
    `<path>: row <n>: <message>` for its first row (rows counted with the header as row 1)."""
    for bad, message in checks:
        bad = np.asarray(bad, dtype=bool)
        if bad.any():
            i = int(bad.argmax())
            raise UserError(f"{path}: row {i + 2}: {message(table.iloc[i])}")


def unsafe_names(table, column, what):
    """A check_rows check: ids that become file names must be safe (htnet.io.is_safe_name)."""
    return (~table[column].map(is_safe_name),
            lambda row: f"{what} {row[column]!r} is not a safe name ({SAFE_NAME_RULE})")


def duplicates(ids, what):
    """A check_rows check: `ids` (indexed like the table read) are unique."""
    first = {value: i + 2 for i, value in ids.drop_duplicates().items()}
    return (ids.duplicated(), lambda row: f"duplicate {what} {ids[row.name]!r} (rows {first[ids[row.name]]}, "
                                          f"{row.name + 2})")


def _check_finite(root, table, images, when):
    bad = ~np.isfinite(images).all(axis=(1, 2, 3))
    if bad.any():
        sample = table["sample"].iloc[int(np.argmax(bad))]
        raise UserError(f"{root}: sample {sample!r} has non-finite pixel values{when}")


def _read_table(csv_path):
    table = read_csv(csv_path, REQUIRED_COLUMNS)
    if table.empty:
        raise UserError(f"{csv_path}: no samples")
    labels = table["label"].str.strip()
    table = table.assign(dataset=table["dataset"].str.strip().str.lower(),
                         sample=table["sub"] + "_" + table["filename_o"])
    check_rows(csv_path, table, [
        unsafe_names(table, "sub", "subject id"), unsafe_names(table, "filename_o", "sample name"),
        (~labels.isin(CLASSES), lambda row: f"label {row['label']!r} is not one of 0, 1, 2"),  # '1.5', '1.0', ''
        (table["dataset"] == "", lambda row: "empty dataset"), duplicates(table["sample"], "sample id")])
    return table.assign(label=labels.astype(np.int64))


def _read_loso_folders(loso_dir):
    """The release's per-subject folders: <subject>/u_test/<label>/<sample> .png, each subject's own samples."""
    rows, seen = [], {}
    for png in sorted(loso_dir.glob("*/u_test/*/*.png")):
        subject_dir, label, sample = png.parents[2], png.parent.name, png.name[: -len(".png")].rstrip()
        for where, what, name in ((subject_dir, "subject id", subject_dir.name), (png, "sample name", sample)):
            if not is_safe_name(name):
                raise UserError(f"{where}: {what} {name!r} is not a safe name ({SAFE_NAME_RULE})")
        if label not in CLASSES:
            raise UserError(f"{png.parent}: label folder {label!r} is not one of 0, 1, 2")
        if sample in seen:  # the sample id keys the landmarks and the predictions
            raise UserError(f"{png}: duplicate sample id {sample!r} (also {seen[sample]})")
        seen[sample] = png
        rows.append({"dataset": _guess_dataset(subject_dir.name), "sub": subject_dir.name, "sample": sample,
                     "label": int(label)})
    if not rows:
        raise UserError(f"{loso_dir}: no images under <subject>/u_test/<label>/")
    return pd.DataFrame(rows), np.stack([read_image(png) for png in seen.values()])


def _guess_dataset(subject):
    """From the composite's subject ids: CASME II 'sub01', SMIC 's01', SAMM '006'."""
    return ("casme2" if subject.startswith("sub") else "smic" if subject.startswith("s")
            else "samm" if subject.isdigit() else "unknown")


def _read_landmarks(root, samples, landmarks):
    template = np.broadcast_to(TEMPLATE_LANDMARKS, (len(samples), 5, 2)).copy()
    path = Path(root) / LANDMARKS_NAME if landmarks == "auto" else Path(landmarks)
    if landmarks == "template" or (landmarks == "auto" and not path.is_file()):
        return template
    if not path.is_file():
        raise UserError(f"landmarks file not found: {path}")
    rows = _landmark_table(path).reindex(samples)
    if rows["detected"].isna().any():
        raise UserError(f"{path}: no landmarks for sample {samples[rows['detected'].isna().to_numpy()].iloc[0]!r}")
    detected = rows["detected"].to_numpy() == 1
    points = rows[LANDMARK_COLUMNS].to_numpy(np.float32).reshape(-1, 5, 2)
    broken = detected & ((points < -LANDMARK_MARGIN) | (points > IMAGE_SHAPE[0] + LANDMARK_MARGIN)).any(axis=(1, 2))
    if broken.any():
        i = int(np.argmax(broken))
        raise UserError(f"{path}: sample {samples.iloc[i]!r}: landmark {points[i].tolist()} is out of the 28x28 image")
    return np.where(detected[:, None, None], points, template).astype(np.float32)


def _landmark_table(path):
    """landmarks_mtcnn.csv indexed by sample: unique safe sample names, detected 0 or 1, coordinates
    numbers (empty where undetected, as in the release), finite where detected."""
    table = read_csv(path, ["sample", "detected", *LANDMARK_COLUMNS])
    detected = pd.to_numeric(table["detected"].str.strip(), errors="coerce")
    text = table[LANDMARK_COLUMNS].apply(lambda column: column.str.strip())
    values = text.apply(pd.to_numeric, errors="coerce").astype(float)
    checks = [unsafe_names(table, "sample", "sample"), duplicates(table["sample"], "sample"),
              (~detected.isin([0, 1]), lambda row: f"detected {row['detected']!r} is not 0 or 1")]
    for c in LANDMARK_COLUMNS:
        checks += [(values[c].isna() & ~text[c].str.lower().isin(["", "nan"]),
                    lambda row, c=c: f"{c} {row[c]!r} is not a number"),
                   ((detected == 1) & ~np.isfinite(values[c]),
                    lambda row, c=c: f"sample {row['sample']!r}: {c} {row[c]!r} is not a finite number "
                                     f"(and detected is 1)")]
    check_rows(path, table, checks)
    return table.assign(detected=detected.astype(int), **values).set_index("sample")


def write_release(root, table, images, landmarks=None):
    """The release layout: the CSV (release columns first, then `table`'s others), one PNG per row of
    `images` ((N, 28, 28, 3) uint8, cv2 order) and, if given, the landmarks_mtcnn.csv table."""
    root = Path(root)
    table = table.reindex(columns=CSV_COLUMNS + [c for c in table.columns if c not in CSV_COLUMNS])
    samples = table["sub"].astype(str) + "_" + table["filename_o"].astype(str)
    table["imagename"] = table["imagename"].astype(object).fillna(samples + ".jpg")
    for sample, image in zip(samples, images):
        ok, png = cv2.imencode(".png", np.ascontiguousarray(image, dtype=np.uint8))
        if not ok:
            raise UserError(f"could not encode image for sample {sample!r}")
        with atomic_write(path_under(root, IMAGE_DIR, f"{sample} .png"), "wb") as f:
            f.write(png.tobytes())
    if landmarks is not None:
        with atomic_write(root / LANDMARKS_NAME) as f:
            landmarks.to_csv(f, index=False)
    with atomic_write(root / CSV_NAME) as f:  # last: a folder with its CSV is complete (synthetic_cache)
        table.to_csv(f, index=False)
