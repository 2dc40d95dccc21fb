"""Raw onset/apex frames -> the release's 28x28 (strain, v, u) flow images, in the release layout.
The INDEX.csv format, frame addressing and exit codes are in docs/design.md."""
import contextlib
import multiprocessing
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from htnet.data.flow import SIZE, flow_image, optical_strain
from htnet.data.release import LANDMARK_COLUMNS, check_rows, duplicates, read_csv, unsafe_names, write_release
from htnet.errors import UserError, first_line
from htnet.io import ensure_writable_dir

REQUIRED_COLUMNS = ["dataset", "subject", "sample", "label", "onset"]
FACE_COLUMNS = ["face_x", "face_y", "face_w", "face_h"]
OPTIONAL_COLUMNS = ["source", "apex", "offset", *FACE_COLUMNS]
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".pgm", ".ppm", ".webp"}
LABELS = {"negative": 0, "positive": 1, "surprise": 2, "0": 0, "1": 1, "2": 2}
INDEX = r"[+-]?\d+"  # a frame given as a 0-based index, else as a path

# TV-L1 parameters: our name -> (OpenCV default, type, help), in OpenCV's positional order.
TVL1_PARAMS = {
    "tau": (0.25, float, "time step of the numerical scheme"),
    "lambda_": (0.15, float, "weight of the data term (smaller = smoother flow)"),
    "theta": (0.3, float, "tightness of the coupling"),
    "nscales": (5, int, "number of pyramid scales"),
    "warps": (5, int, "warpings per scale"),
    "epsilon": (0.01, float, "stopping threshold"),
    "inner_iterations": (30, int, "inner iterations"),
    "outer_iterations": (10, int, "outer iterations"),
    "scale_step": (0.8, float, "pyramid scale step"),
    "gamma": (0.0, float, "weight of the illumination term"),
    "median_filtering": (5, int, "median filter kernel size (1 = off)"),
}


class SampleError(Exception):
    """One sample cannot be processed; the others go on."""


def _tvl1_values(params):
    unknown = sorted(set(params) - set(TVL1_PARAMS))
    if unknown:
        raise UserError(f"unknown TV-L1 parameter {unknown[0]!r}")
    return [typ(params.get(k, default)) for k, (default, typ, _) in TVL1_PARAMS.items()]


def tvl1_flow(onset_gray, apex_gray, **params):
    """TV-L1 flow onset -> apex as float32 (u, v) pixels: u > 0 moved right, v > 0 moved down."""
    flow = cv2.optflow.DualTVL1OpticalFlow_create(*_tvl1_values(params)).calc(
        _to_gray(onset_gray), _to_gray(apex_gray), None)
    return flow[..., 0].astype(np.float32), flow[..., 1].astype(np.float32)


def list_frames(folder):
    """The image files of `folder` in natural order (img2 before img10)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SampleError(f"frame folder not found: {folder}")
    files = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    if not files:
        raise SampleError(f"no image files in {folder}")
    return sorted(files, key=lambda p: [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", p.name)])


def _to_gray(img):
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2GRAY if img.shape[2] == 4 else cv2.COLOR_BGR2GRAY)
    if img.dtype != np.uint8:
        img = cv2.normalize(img, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    return img


def _read_image(path):
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise SampleError(f"cannot read image {path}")
    return _to_gray(img)


def _at(seq, index, what):
    """Frame `index` of a folder of frames or of a video as 2-D uint8 gray; with index None, how many frames
    it has. A video is decoded frame by frame: seeking and a container's count are not exact for all codecs."""
    if seq.is_dir():
        frames = list_frames(seq)
        if index is not None and not 0 <= index < len(frames):
            raise SampleError(f"{what} {index} out of range: {seq} has {len(frames)} frames")
        return len(frames) if index is None else _read_image(frames[index])
    if not seq.exists():
        raise SampleError(f"source not found: {seq}")
    cap = cv2.VideoCapture(str(seq))
    if not cap.isOpened():
        raise SampleError(f"cannot open video {seq}")
    try:
        if index is None:
            return sum(1 for _ in iter(cap.grab, False))
        ok, img = cap.read() if index >= 0 and all(cap.grab() for _ in range(index)) else (False, None)
    finally:
        cap.release()
    if not ok or img is None:
        raise SampleError(f"frame {index} out of range in video {seq}")
    return _to_gray(img)


def _frame(spec, frames_root, source, what):
    """(gray image, 0-based index; -1 where unknown) for an onset/apex/offset cell."""
    if re.fullmatch(INDEX, spec):
        if source is None:
            raise SampleError(f"{what} {spec} is an index but the sample has no source")
        return _at(source, int(spec), what), int(spec)
    path = frames_root / spec
    if not path.is_file() and source is not None and source.is_dir() and (source / spec).is_file():
        path = source / spec  # a bare file name inside the source folder
    if not path.is_file():
        raise SampleError(f"{what} frame not found: {path}")
    frames = list_frames(path.parent) if path.suffix.lower() in IMAGE_EXTENSIONS else []
    return _read_image(path), frames.index(path) if path in frames else -1


def _crop(img, box, what):
    if box is None:
        return img
    x, y, w, h = box
    face = img[max(0, y):max(0, y + h), max(0, x):max(0, x + w)]
    if min(face.shape) < 2:
        raise SampleError(f"face box {box} is outside the {what} frame of size {img.shape[1]}x{img.shape[0]}")
    return face


def preprocess_sample(row, frames_root, face_size=224, landmarks=None, tvl1=None):
    """One read_index row -> (28x28x3 uint8 image, info: apex, onset, apex_source (index|middle), detected and the
    landmark columns, `landmarks` from apex-face to 28x28 pixels); SampleError if broken."""
    frames_root = Path(frames_root)
    source = frames_root / row["source"] if row["source"] else None
    onset, onset_idx = _frame(row["onset"], frames_root, source, "onset")
    if row["apex"]:
        (apex, apex_idx), apex_source = _frame(row["apex"], frames_root, source, "apex"), "index"
    else:  # the middle frame, as for SMIC
        if onset_idx < 0:
            raise SampleError("no apex given and the onset's index in its folder is unknown")
        seq = source if source is not None else (frames_root / row["onset"]).parent
        offset = row["offset"]
        if re.fullmatch(INDEX, offset):
            offset_idx = int(offset)
        elif offset:
            offset_idx = _frame(offset, frames_root, source, "offset")[1]
        else:
            offset_idx = _at(seq, None, "offset") - 1
        if offset_idx < onset_idx:
            raise SampleError(f"offset {offset_idx} is before onset {onset_idx}")
        apex_idx, apex_source = (onset_idx + offset_idx) // 2, "middle"
        apex = _at(seq, apex_idx, "apex")
    box = tuple(round(float(row[k])) for k in FACE_COLUMNS) if any(row[k] for k in FACE_COLUMNS) else None
    onset, apex = _crop(onset, box, "onset"), _crop(apex, box, "apex")
    if onset.shape != apex.shape:
        raise SampleError(f"onset ({onset.shape[1]}x{onset.shape[0]}) and apex "
                          f"({apex.shape[1]}x{apex.shape[0]}) differ in size")
    face_h, face_w = apex.shape
    if face_size:
        interp = cv2.INTER_AREA if face_size < min(face_h, face_w) else cv2.INTER_LINEAR
        onset, apex = (cv2.resize(x, (face_size, face_size), interpolation=interp) for x in (onset, apex))
    u, v = tvl1_flow(onset, apex, **(tvl1 or {}))
    try:
        image = flow_image(u, v, optical_strain(u.astype(np.float64), v.astype(np.float64)))
    except ValueError as e:  # a non-finite flow
        raise SampleError(str(e)) from None
    points = [np.nan] * 10 if landmarks is None else (np.reshape(landmarks, (5, 2)) * [SIZE / face_w, SIZE / face_h])
    return image, {"apex": apex_idx, "onset": onset_idx, "apex_source": apex_source,
                   "detected": int(landmarks is not None), **dict(zip(LANDMARK_COLUMNS, np.ravel(points)))}


def _worker(job):
    i, args = job
    try:
        return i, preprocess_sample(*args), None
    except SampleError as e:
        return i, None, str(e)
    except cv2.error as e:
        return i, None, f"OpenCV: {(str(e).strip().splitlines() or [e])[-1]}"
    except Exception as e:  # noqa: BLE001 - a broken sample must not stop the others
        return i, None, f"{type(e).__name__}: {first_line(e)}"


def read_index(index_csv):
    """INDEX.csv as stripped strings, every optional column, label as int, id '<subject>_<sample>'; a
    UserError names the file, row and column of a problem."""
    df = read_csv(index_csv, REQUIRED_COLUMNS, strip=True)
    face = [c for c in FACE_COLUMNS if c not in df]
    if 0 < len(face) < len(FACE_COLUMNS):
        raise UserError(f"{index_csv}: missing column {face[0]!r} (face box needs all of {', '.join(FACE_COLUMNS)})")
    if df.empty:
        raise UserError(f"{index_csv}: no samples")
    df = df.assign(**{c: "" for c in OPTIONAL_COLUMNS if c not in df}, id=df["subject"] + "_" + df["sample"])
    labels = df["label"].str.lower().map(LABELS)
    has_box = df[FACE_COLUMNS].ne("").any(axis=1)
    checks = [(df[c] == "", lambda r, c=c: f"empty {c!r}") for c in ("dataset", "subject", "sample", "onset")]
    checks += [unsafe_names(df, c, f"column {c!r} value") for c in ("subject", "sample")]
    checks.append((labels.isna(), lambda r: f"column 'label' value {r['label']!r} is not 0/1/2 or "
                                            f"negative/positive/surprise"))
    for c in ("onset", "apex", "offset"):
        index = pd.to_numeric(df[c].where(df[c].str.fullmatch(INDEX)), errors="coerce")
        checks.append((index < 0, lambda r, c=c: f"column {c!r} value {r[c]!r} is a negative index"))
        checks.append((index.notna() & (df["source"] == ""),
                       lambda r, c=c: f"column {c!r} is an index ({r[c]}) but column 'source' is empty"))
    for c in FACE_COLUMNS:
        number = pd.to_numeric(df[c], errors="coerce")
        checks.append((has_box & number.isna(), lambda r, c=c: f"column {c!r} value {r[c]!r} is not a number"))
        if c in ("face_w", "face_h"):
            checks.append((has_box & (number <= 0), lambda r, c=c: f"column {c!r} value {r[c]!r} must be > 0"))
    checks.append(duplicates(df["id"], "sample"))
    check_rows(index_csv, df, checks)
    return df.assign(label=labels.astype(int))


def read_landmarks(path, index):
    """User landmarks (apex-face pixels) -> {sample id: 10 floats}; undetected or empty rows are skipped."""
    df = read_csv(path, ["sample", *LANDMARK_COLUMNS], strip=True)
    ids = index["id"]
    unique = index["sample"].map(index["sample"].value_counts()) == 1
    found = df["sample"].map({**dict(zip(index["sample"][unique], ids[unique])), **dict(zip(ids, ids))})
    numbers = df[LANDMARK_COLUMNS].apply(pd.to_numeric, errors="coerce").astype(float)
    keep = (df.get("detected", "") != "0") & df[LANDMARK_COLUMNS].ne("").any(axis=1)
    checks = [(found.isna(), lambda r: f"column 'sample' value {r['sample']!r} is not a sample of the index")]
    checks += [(keep & numbers[c].isna(), lambda r, c=c: f"column {c!r} value {r[c]!r} is not a number")
               for c in LANDMARK_COLUMNS]
    check_rows(path, df, checks)
    return dict(zip(found[keep], numbers[keep].to_numpy().tolist()))


def preprocess(index_csv, frames_root, out_dir, workers=None, face_size=224, landmarks=None, progress=True,
               **tvl1):
    """Every sample of `index_csv` -> the release layout under `out_dir`, only those that succeeded (nothing
    if none did); broken ones printed on stderr as they happen. Returns total, ok, failed [(id, reason)], out."""
    from tqdm import tqdm

    frames_root, out_dir = Path(frames_root), Path(out_dir)
    if not frames_root.is_dir():
        raise UserError(f"frames root not found: {frames_root}")
    _tvl1_values(tvl1)
    if face_size is not None and face_size < 0:
        raise UserError(f"face size {face_size} must be >= 0")
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    index = read_index(index_csv)
    ids = index["id"].tolist()
    user_landmarks = read_landmarks(landmarks, index) if landmarks else {}
    ensure_writable_dir(out_dir)
    jobs = [(i, (row, str(frames_root), face_size, user_landmarks.get(ids[i]), tvl1))
            for i, row in enumerate(index.to_dict("records"))]
    results, failed = {}, {}
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    pool = contextlib.nullcontext()
    if workers > 1:  # spawn, not fork: a forked child can deadlock in OpenCV's thread pool
        pool = ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"), initializer=cv2.setNumThreads,
                                   initargs=(1,))
    with pool, tqdm(total=len(jobs), desc="preprocess", unit="sample", disable=not progress, file=sys.stderr) as bar:
        outcomes = map(_worker, jobs) if workers == 1 else (
            future.result() for future in as_completed([pool.submit(_worker, job) for job in jobs]))
        for i, result, error in outcomes:
            if error is None:
                results[i] = result
            else:
                failed[i] = (ids[i], error)
                bar.write(f"error: sample {ids[i]}: {error}", file=sys.stderr)
            bar.update(1)
    if results:
        done = sorted(results)
        info = pd.DataFrame([results[i][1] for i in done])
        table = index.iloc[done].reset_index(drop=True).rename(columns={"subject": "sub", "sample": "filename_o"})
        table = table[["dataset", "sub", "filename_o", "label", "id"]].join(info[["apex", "onset", "apex_source"]])
        table = table.rename(columns={"id": "sub_filename"})
        points = info[["detected", *LANDMARK_COLUMNS]].round(6)
        points.insert(0, "sample", table["sub_filename"])
        write_release(out_dir, table, np.stack([results[i][0] for i in done]), points)
    return {"total": len(jobs), "ok": len(results), "failed": [failed[i] for i in sorted(failed)], "out": str(out_dir)}
