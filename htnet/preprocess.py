"""From raw frames to the release's 28x28 u/v/optical-strain images.

    python -m htnet preprocess --index INDEX.csv --frames-root DIR --out DIR [options]

For every sample in INDEX.csv: read the onset and apex frame as grayscale, crop the face (when a
face box is given), resize it to ``face_size`` x ``face_size``, compute TV-L1 optical flow
(``cv2.optflow.DualTVL1OpticalFlow_create``) from onset to apex, the optical strain
``sqrt(e_xx^2 + e_yy^2 + 2 e_xy^2)`` with ``e_xx = du/dx``, ``e_yy = dv/dy``,
``e_xy = (du/dy + dv/dx) / 2`` (central differences), resize u, v and strain to 28x28
(INTER_AREA) and min-max scale each channel of each image to 0..255. The result is written in the
HTNet release layout, so ``htnet.data.load_release(out)`` and training read it unchanged::

    <out>/combined_3_class2_for_optical_flow.csv
        dataset,sub,filename_o,label,apex,imagename,sub_filename,onset,apex_source
    <out>/datasets/STSNet_whole_norm_u_v_os/<sub>_<filename_o> .png   (note the space)
    <out>/landmarks_mtcnn.csv

``apex`` and ``onset`` hold the frame indices used (0-based positions in the sample's sorted frame
list or video), ``apex_source`` is ``index`` (the apex came from INDEX.csv) or ``middle`` (no apex
was given, the middle frame was taken, as for SMIC), ``imagename`` is ``<sub>_<filename_o>.jpg``
as in the release and ``sub_filename`` is the sample id ``<sub>_<filename_o>``. Only samples that
succeeded are listed.

PNG channel order (as ``cv2.imread`` returns it, and as it is written with ``cv2.imwrite``):
index 0 = optical strain, 1 = v (vertical flow, positive = downwards), 2 = u (horizontal flow,
positive = to the right). This is the release's order: the release PNGs hold (u, v, strain) as
RGB, which cv2 reads as BGR. (Checked on the release: channel 0 is the skewed, non-negative one,
and its square is fit by the strain formula only with u = channel 2, v = channel 1.)

INDEX.csv (read as text; one row per sample)
--------------------------------------------
Required columns:
    dataset   free text, e.g. casme2, smic, samm (the per-dataset metrics use it)
    subject   the LOSO subject id (written as ``sub``); must not collide across datasets
    sample    the sample name within the subject (written as ``filename_o``)
    label     0/1/2 or negative/positive/surprise
    onset     a frame: an image path relative to --frames-root, or an integer index
Optional columns:
    apex      like onset; empty (or column absent) -> the middle frame, see below
    offset    like onset; only used to find the middle frame
    source    a folder of frames or a video file, relative to --frames-root
    face_x, face_y, face_w, face_h
              a face box in frame pixels (all four or none; clipped to the frame), the same
              for onset and apex; without it the frames are taken as already cropped faces

A frame given as an integer is a 0-based index into ``source``: into its image files
(.jpg .jpeg .png .bmp .tif .tiff .pgm .ppm .webp) sorted in natural order (img2 before img10), or into the frames
of the video (cv2.VideoCapture). A frame given as a path needs no ``source``; its index is its
position in its own folder. Without an apex the middle frame is used:
``(onset + offset) // 2`` where offset is the offset column, or else the last frame of the folder
or video.

Landmarks (optional, ``--landmarks FILE``): a CSV with columns ``sample`` (``<sub>_<filename_o>``
or the bare ``sample`` of INDEX.csv when that is unique) and left_eye_x, left_eye_y, right_eye_x,
right_eye_y, nose_x, nose_y, mouth_left_x, mouth_left_y, mouth_right_x, mouth_right_y in pixels of
the apex face (after the face box crop, before any resizing). They are scaled to 28x28 and written
to ``landmarks_mtcnn.csv`` with detected=1; every other sample gets detected=0 and empty values,
for which the loader uses the reference template.

Errors: a bad INDEX.csv (missing file or column, bad value) is a UserError naming the file, row
and column; nothing is written. A sample that fails (missing or unreadable frame, index out of
range, bad face box) prints ``error: sample <sub>_<sample>: <reason>`` to stderr and the others go
on; a summary of the failures follows at the end. ``run`` returns 0 when every sample succeeded,
1 when some failed (the others are written), 2 on a UserError.
"""
from __future__ import annotations

import argparse
import math
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
from htnet.data.release import (CSV_COLUMNS, CSV_NAME, IMAGE_DIR, LANDMARK_COLUMNS,  # noqa: F401
                                LANDMARKS_NAME, write_release)
from htnet.errors import UserError
from htnet.io import SAFE_NAME_RULE, is_safe_name

EXTRA_COLUMNS = ["onset", "apex_source"]
REQUIRED_COLUMNS = ["dataset", "subject", "sample", "label", "onset"]
FACE_COLUMNS = ["face_x", "face_y", "face_w", "face_h"]
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".pgm", ".ppm", ".webp"}
LABEL_NAMES = {"negative": 0, "positive": 1, "surprise": 2}

# TV-L1 parameters: our name -> (OpenCV default, type, help). Passed positionally in this order.
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


# ---------------------------------------------------------------------------------------------
# Pure functions


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def list_frames(folder) -> list[Path]:
    """The image files of `folder`, in natural order (img2 before img10)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SampleError(f"frame folder not found: {folder}")
    files = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    if not files:
        raise SampleError(f"no image files in {folder}")
    return sorted(files, key=lambda p: _natural_key(p.name))


def _to_gray(img: np.ndarray) -> np.ndarray:
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2GRAY if img.shape[2] == 4 else cv2.COLOR_BGR2GRAY)
    if img.dtype != np.uint8:
        img = cv2.normalize(img, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    return img


def video_frame_count(path) -> int:
    """Number of frames of a video, counted by decoding (the container's count can be wrong)."""
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise SampleError(f"cannot open video {path}")
    n = 0
    try:
        while cap.grab():
            n += 1
    finally:
        cap.release()
    if n == 0:
        raise SampleError(f"no frames in video {path}")
    return n


def read_frame(path, index: int | None = None) -> np.ndarray:
    """One frame as 2-D uint8 grayscale: an image file (index None) or frame `index` of a video."""
    path = Path(path)
    if index is None:
        if not path.is_file():
            raise SampleError(f"frame not found: {path}")
        img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if img is None:
            raise SampleError(f"cannot read image {path}")
        return _to_gray(img)
    if not path.is_file():
        raise SampleError(f"video not found: {path}")
    if index < 0:
        raise SampleError(f"negative frame index {index} in video {path}")
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise SampleError(f"cannot open video {path}")
    try:
        for _ in range(index):  # decode sequentially: seeking is not frame-exact for all codecs
            if not cap.grab():
                raise SampleError(f"frame {index} out of range in video {path}")
        ok, img = cap.read()
    finally:
        cap.release()
    if not ok or img is None:
        raise SampleError(f"frame {index} out of range in video {path}")
    return _to_gray(img)


def tvl1_flow(onset_gray: np.ndarray, apex_gray: np.ndarray, **params) -> tuple[np.ndarray, np.ndarray]:
    """TV-L1 optical flow from onset to apex: (u, v) float32, in pixels.

    u > 0: the content moved to the right from onset to apex; v > 0: it moved down
    (onset(x, y) ~ apex(x + u, y + v)). `params` are the keys of TVL1_PARAMS (OpenCV defaults).
    """
    unknown = set(params) - set(TVL1_PARAMS)
    if unknown:
        raise UserError(f"unknown TV-L1 parameter {sorted(unknown)[0]!r}")
    values = [TVL1_PARAMS[k][1](params.get(k, TVL1_PARAMS[k][0])) for k in TVL1_PARAMS]
    if onset_gray.shape != apex_gray.shape:
        raise SampleError(f"onset {onset_gray.shape} and apex {apex_gray.shape} differ in size")
    tvl1 = cv2.optflow.DualTVL1OpticalFlow_create(*values)
    flow = tvl1.calc(_to_gray(onset_gray), _to_gray(apex_gray), None)
    return flow[..., 0].astype(np.float32), flow[..., 1].astype(np.float32)


# ---------------------------------------------------------------------------------------------
# One sample


def _cell(row: dict, key: str) -> str:
    value = row.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()


def _is_index(text: str) -> bool:
    return re.fullmatch(r"[+-]?\d+", text) is not None


def _resolve(spec: str, source: Path | None, what: str):
    """An integer frame spec -> (image path or (video path, index), index)."""
    index = int(spec)
    if source is None:
        raise SampleError(f"{what} {index} is an index but the sample has no source")
    if source.is_dir():
        frames = list_frames(source)
        if not 0 <= index < len(frames):
            raise SampleError(f"{what} {index} out of range: {source} has {len(frames)} frames")
        return frames[index], index
    if not source.exists():
        raise SampleError(f"source not found: {source}")
    return (source, index), index


def _frame(spec: str, frames_root: Path, source: Path | None, what: str):
    """(gray image, 0-based index) for an onset/apex/offset spec."""
    if _is_index(spec):
        target, index = _resolve(spec, source, what)
        if isinstance(target, tuple):
            return read_frame(*target), index
        return read_frame(target), index
    path = frames_root / spec
    if not path.is_file() and source is not None and source.is_dir() and (source / spec).is_file():
        path = source / spec  # a bare file name inside the source folder
    if not path.is_file():
        raise SampleError(f"{what} frame not found: {path}")
    try:
        names = [f.name for f in list_frames(path.parent)]
        index = names.index(path.name) if path.name in names else -1
    except SampleError:
        index = -1
    return read_frame(path), index


def _frame_count_and_folder(spec: str, frames_root: Path, source: Path | None):
    if source is not None:
        if source.is_dir():
            return len(list_frames(source))
        if source.is_file():
            return video_frame_count(source)
        raise SampleError(f"source not found: {source}")
    return len(list_frames((frames_root / spec).parent))


def _crop(img: np.ndarray, box, what: str) -> np.ndarray:
    if box is None:
        return img
    x, y, w, h = box
    x0, y0 = max(0, x), max(0, y)
    x1, y1 = min(img.shape[1], x + w), min(img.shape[0], y + h)
    if x1 - x0 < 2 or y1 - y0 < 2:
        raise SampleError(f"face box {box} is outside the {what} frame of size "
                          f"{img.shape[1]}x{img.shape[0]}")
    return img[y0:y1, x0:x1]


def sample_id(row: dict) -> str:
    return f"{_cell(row, 'subject')}_{_cell(row, 'sample')}"


def preprocess_sample(row: dict, frames_root, face_size: int = 224, landmarks=None,
                      tvl1: dict | None = None):
    """Process one INDEX.csv row (a dict of strings).

    Returns (image 28x28x3 uint8, info) where info holds onset, apex, apex_source and landmarks
    (10 floats in 28x28 pixels, or None). Raises SampleError on a broken sample.
    `landmarks`: 10 floats in apex-face pixels, or None.
    """
    frames_root = Path(frames_root)
    src = _cell(row, "source")
    source = frames_root / src if src else None
    onset_spec = _cell(row, "onset")
    apex_spec = _cell(row, "apex")
    onset_img, onset_idx = _frame(onset_spec, frames_root, source, "onset")
    if apex_spec:
        apex_img, apex_idx = _frame(apex_spec, frames_root, source, "apex")
        apex_source = "index"
    else:
        offset_spec = _cell(row, "offset")
        if onset_idx < 0:
            raise SampleError("no apex given and the onset's index in its folder is unknown")
        if offset_spec:
            if _is_index(offset_spec):
                offset_idx = int(offset_spec)
            else:
                _, offset_idx = _frame(offset_spec, frames_root, source, "offset")
        else:
            offset_idx = _frame_count_and_folder(onset_spec, frames_root, source) - 1
        if offset_idx < onset_idx:
            raise SampleError(f"offset {offset_idx} is before onset {onset_idx}")
        middle = (onset_idx + offset_idx) // 2
        if source is None:  # onset given as a path: index its folder
            folder_frames = list_frames((frames_root / onset_spec).parent)
            apex_img, apex_idx = read_frame(folder_frames[middle]), middle
        else:
            apex_img, apex_idx = _frame(str(middle), frames_root, source, "apex")
        apex_source = "middle"

    box = None
    if any(_cell(row, k) for k in FACE_COLUMNS):
        box = tuple(int(round(float(_cell(row, k)))) for k in FACE_COLUMNS)
    onset_img = _crop(onset_img, box, "onset")
    apex_img = _crop(apex_img, box, "apex")
    if onset_img.shape != apex_img.shape:
        raise SampleError(f"onset ({onset_img.shape[1]}x{onset_img.shape[0]}) and apex "
                          f"({apex_img.shape[1]}x{apex_img.shape[0]}) differ in size")
    face_h, face_w = apex_img.shape
    if face_size:
        interp = cv2.INTER_AREA if face_size < min(face_h, face_w) else cv2.INTER_LINEAR
        onset_img = cv2.resize(onset_img, (face_size, face_size), interpolation=interp)
        apex_img = cv2.resize(apex_img, (face_size, face_size), interpolation=interp)

    u, v = tvl1_flow(onset_img, apex_img, **(tvl1 or {}))
    try:
        image = flow_image(u, v, optical_strain(u.astype(np.float64), v.astype(np.float64)))
    except ValueError as e:  # a non-finite flow
        raise SampleError(str(e)) from None

    lm28 = None
    if landmarks is not None:
        pts = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
        lm28 = (pts * [SIZE / face_w, SIZE / face_h]).ravel().tolist()
    info = {"onset": onset_idx, "apex": apex_idx, "apex_source": apex_source, "landmarks": lm28}
    return image, info


def _worker(args):
    i, row, frames_root, face_size, landmarks, tvl1 = args
    try:
        image, info = preprocess_sample(row, frames_root, face_size, landmarks, tvl1)
        return i, image, info, None
    except SampleError as e:
        return i, None, None, str(e)
    except cv2.error as e:
        msg = str(e).strip().splitlines()
        return i, None, None, f"OpenCV: {msg[-1] if msg else e}"
    except Exception as e:  # noqa: BLE001 - a broken sample must not stop the others
        return i, None, None, f"{type(e).__name__}: {e}".splitlines()[0]


def _init_worker():
    cv2.setNumThreads(1)  # the processes already use the cores


# ---------------------------------------------------------------------------------------------
# Index and landmark files


def read_index(index_csv) -> pd.DataFrame:
    """Read and check INDEX.csv; a UserError names the file, row and column of the first problem."""
    index_csv = Path(index_csv)
    if not index_csv.is_file():
        raise UserError(f"index file not found: {index_csv}")
    try:
        df = pd.read_csv(index_csv, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise UserError(f"{index_csv}: not a readable CSV: {str(e).splitlines()[0]}") from None
    df.columns = [str(c).strip() for c in df.columns]
    for col in REQUIRED_COLUMNS:
        if col not in df.columns:
            raise UserError(f"{index_csv}: missing column {col!r} (required: "
                            f"{', '.join(REQUIRED_COLUMNS)})")
    present_face = [c for c in FACE_COLUMNS if c in df.columns]
    if present_face and len(present_face) != 4:
        missing = [c for c in FACE_COLUMNS if c not in df.columns][0]
        raise UserError(f"{index_csv}: missing column {missing!r} (face box needs all of "
                        f"{', '.join(FACE_COLUMNS)})")
    if len(df) == 0:
        raise UserError(f"{index_csv}: no samples")
    df = df.apply(lambda s: s.str.strip())
    seen = {}
    labels = []
    for i, row in enumerate(df.to_dict("records")):
        where = f"{index_csv}: row {i + 2}"
        for col in ("dataset", "subject", "sample", "onset"):
            if not row[col]:
                raise UserError(f"{where}: empty {col!r}")
        for col in ("subject", "sample"):  # they become file names (<subject>_<sample> .png)
            if not is_safe_name(row[col]):
                raise UserError(f"{where}: column {col!r} value {row[col]!r} is not a safe name ({SAFE_NAME_RULE})")
        lab = row["label"].lower()
        if lab in LABEL_NAMES:
            labels.append(LABEL_NAMES[lab])
        elif lab in ("0", "1", "2"):
            labels.append(int(lab))
        else:
            raise UserError(f"{where}: column 'label' value {row['label']!r} is not 0/1/2 or "
                            f"negative/positive/surprise")
        for col in ("onset", "apex", "offset"):
            val = row.get(col, "")
            if val and _is_index(val) and int(val) < 0:
                raise UserError(f"{where}: column {col!r} value {val!r} is a negative index")
            if val and _is_index(val) and not row.get("source", ""):
                raise UserError(f"{where}: column {col!r} is an index ({val}) but column "
                                f"'source' is empty")
        if present_face:
            vals = [row[c] for c in FACE_COLUMNS]
            if any(vals):
                for c in FACE_COLUMNS:
                    try:
                        x = float(row[c])
                    except ValueError:
                        raise UserError(f"{where}: column {c!r} value {row[c]!r} is not a "
                                        f"number") from None
                    if c in ("face_w", "face_h") and x <= 0:
                        raise UserError(f"{where}: column {c!r} value {row[c]!r} must be > 0")
        sid = sample_id(row)
        if sid in seen:
            raise UserError(f"{where}: sample {sid!r} repeats row {seen[sid]}")
        seen[sid] = i + 2
    df["label"] = labels
    return df


def read_landmarks(path, index: pd.DataFrame) -> dict[str, list[float]]:
    """User landmarks (apex-face pixels) -> {sample id: 10 floats}; empty rows are skipped."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"landmarks file not found: {path}")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a readable CSV: {str(e).splitlines()[0]}") from None
    df.columns = [str(c).strip() for c in df.columns]
    for col in ["sample"] + LANDMARK_COLUMNS:
        if col not in df.columns:
            raise UserError(f"{path}: missing column {col!r}")
    ids = {sample_id(r) for r in index.to_dict("records")}
    bare = index["sample"].value_counts()
    bare_to_id = {r["sample"]: sample_id(r) for r in index.to_dict("records")
                  if bare[r["sample"]] == 1}
    out = {}
    for i, row in enumerate(df.to_dict("records")):
        name = row["sample"].strip()
        sid = name if name in ids else bare_to_id.get(name)
        if sid is None:
            raise UserError(f"{path}: row {i + 2}: column 'sample' value {name!r} is not a "
                            f"sample of the index")
        if "detected" in row and row["detected"].strip() == "0":
            continue
        vals = [row[c].strip() for c in LANDMARK_COLUMNS]
        if not any(vals):
            continue
        try:
            out[sid] = [float(x) for x in vals]
        except ValueError:
            bad = next(c for c, x in zip(LANDMARK_COLUMNS, vals) if not _is_float(x))
            raise UserError(f"{path}: row {i + 2}: column {bad!r} value {row[bad]!r} is not a "
                            f"number") from None
    return out


def _is_float(x: str) -> bool:
    try:
        float(x)
        return True
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------
# The whole run


def preprocess(index_csv, frames_root, out_dir, workers: int | None = None, face_size: int = 224,
               landmarks=None, progress: bool = True, **tvl1) -> dict:
    """Preprocess every sample of `index_csv` into the release layout under `out_dir`.

    Returns a summary {"total", "ok", "failed": [(sample id, reason), ...], "out"}. Broken samples
    are reported on stderr as they happen; the CSVs list only the samples that succeeded and are
    not written when none did. Raises UserError for a bad index, landmarks file or folder.
    """
    from tqdm import tqdm

    frames_root = Path(frames_root)
    out_dir = Path(out_dir)
    if not frames_root.is_dir():
        raise UserError(f"frames root not found: {frames_root}")
    unknown = set(tvl1) - set(TVL1_PARAMS)
    if unknown:
        raise UserError(f"unknown TV-L1 parameter {sorted(unknown)[0]!r}")
    if face_size is not None and face_size < 0:
        raise UserError(f"face size {face_size} must be >= 0")
    index = read_index(index_csv)
    user_lm = read_landmarks(landmarks, index) if landmarks else {}
    rows = index.to_dict("records")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output folder {out_dir}: {e.strerror}") from None

    workers = workers or os.cpu_count() or 1
    workers = max(1, min(workers, len(rows)))
    jobs = [(i, r, str(frames_root), face_size, user_lm.get(sample_id(r)), tvl1)
            for i, r in enumerate(rows)]
    results: dict[int, tuple] = {}
    failed: list[tuple[str, str]] = []
    bar = tqdm(total=len(jobs), desc="preprocess", unit="sample", disable=not progress,
               file=sys.stderr)

    def handle(res):
        i, image, info, err = res
        sid = sample_id(rows[i])
        if err is None:
            results[i] = (image, info)
        else:
            failed.append((sid, err))
            msg = f"error: sample {sid}: {err}"
            if progress:
                bar.write(msg, file=sys.stderr)
            else:
                print(msg, file=sys.stderr)
        bar.update(1)

    try:
        if workers == 1:
            for job in jobs:
                handle(_worker(job))
        else:
            # spawn, not fork: a forked child can deadlock in OpenCV's thread pool
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx,
                                     initializer=_init_worker) as pool:
                futures = [pool.submit(_worker, job) for job in jobs]
                for fut in as_completed(futures):
                    handle(fut.result())
    finally:
        bar.close()

    if results:
        ok_rows = [(i, rows[i], results[i][1]) for i in sorted(results)]
        table = pd.DataFrame({
            "dataset": [r["dataset"] for _, r, _ in ok_rows],
            "sub": [r["subject"] for _, r, _ in ok_rows],
            "filename_o": [r["sample"] for _, r, _ in ok_rows],
            "label": [int(r["label"]) for _, r, _ in ok_rows],
            "apex": [info["apex"] for _, _, info in ok_rows],
            "imagename": [f"{sample_id(r)}.jpg" for _, r, _ in ok_rows],
            "sub_filename": [sample_id(r) for _, r, _ in ok_rows],
            "onset": [info["onset"] for _, _, info in ok_rows],
            "apex_source": [info["apex_source"] for _, _, info in ok_rows],
        }, columns=CSV_COLUMNS + EXTRA_COLUMNS)
        lm_rows = []
        for _, r, info in ok_rows:
            lm = info["landmarks"]
            lm_rows.append([sample_id(r), 1 if lm else 0]
                           + ([round(x, 6) for x in lm] if lm else [""] * len(LANDMARK_COLUMNS)))
        lm_table = pd.DataFrame(lm_rows, columns=["sample", "detected"] + LANDMARK_COLUMNS)
        write_release(out_dir, table, np.stack([results[i][0] for i in sorted(results)]), lm_table)

    n_ok = len(results)
    if failed:
        order = {sample_id(r): i for i, r in enumerate(rows)}
        failed.sort(key=lambda f: order[f[0]])
    return {"total": len(rows), "ok": n_ok, "failed": failed, "out": str(out_dir)}


def format_summary(summary: dict) -> str:
    lines = [f"preprocessed {summary['ok']} of {summary['total']} samples into {summary['out']}"]
    if summary["failed"]:
        lines.append(f"{len(summary['failed'])} failed:")
        lines += [f"  {sid}: {reason}" for sid, reason in summary["failed"]]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of `python -m htnet preprocess`."""
    parser.add_argument("--index", required=True, metavar="INDEX.csv",
                        help="samples: dataset,subject,sample,label,onset[,apex,offset,source,"
                             "face_x,face_y,face_w,face_h]")
    parser.add_argument("--frames-root", required=True, metavar="DIR",
                        help="frame paths and sources in the index are relative to this folder")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output folder (release layout)")
    parser.add_argument("--workers", type=int, default=None,
                        help="parallel processes (default: number of CPU cores)")
    parser.add_argument("--face-size", type=int, default=224,
                        help="resize the (cropped) face to this square size before the flow; "
                             "0 keeps the frame size (default 224, as the release's apex faces)")
    parser.add_argument("--landmarks", metavar="CSV", default=None,
                        help="apex-face landmarks: sample + left_eye_x ... mouth_right_y in "
                             "apex-face pixels (default: none, the loader uses the template)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = parser.add_argument_group("TV-L1 optical flow (OpenCV defaults)")
    for name, (default, typ, help_) in TVL1_PARAMS.items():
        flag = "--tvl1-" + name.rstrip("_").replace("_", "-")
        g.add_argument(flag, dest="tvl1_" + name, type=typ, default=default,
                       metavar=typ.__name__.upper(),
                       help=f"{help_} (default {default})")
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the preprocess command: 0 all samples done, 1 some failed, 2 bad input (UserError)."""
    tvl1 = {name: getattr(args, "tvl1_" + name) for name in TVL1_PARAMS
            if hasattr(args, "tvl1_" + name)}
    if args.workers is not None and args.workers < 1:
        print(f"error: --workers must be >= 1, got {args.workers}", file=sys.stderr)
        return 2
    try:
        summary = preprocess(args.index, args.frames_root, args.out, workers=args.workers,
                             face_size=args.face_size, landmarks=args.landmarks,
                             progress=not args.no_progress, **tvl1)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary), file=sys.stderr)
    return 1 if summary["failed"] else 0


def main(argv=None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="python -m htnet preprocess",
                                                   description=__doc__.split("\n")[0]))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
