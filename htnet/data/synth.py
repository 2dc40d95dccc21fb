"""A deterministic synthetic composite in the release layout (for laptops, CI and tests): class-dependent
made-up motion on a 28x28 face per subject, with the real composite's class shares (docs/design.md)."""
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from htnet.data.flow import flow_image
from htnet.data.release import CSV_NAME, LANDMARK_COLUMNS, TEMPLATE_LANDMARKS, write_release
from htnet.errors import UserError

# Real class counts (negative, positive, surprise) per source dataset.
CLASS_COUNTS = {"casme2": (88, 32, 25), "smic": (70, 51, 43), "samm": (92, 26, 15)}
# Per class: (landmarks whose mean is the centre, offset from it, du, dv, sigma); brows sit 3 px above the eyes.
MOTIONS = {
    0: [((0,), (0, -3.0), 0.6, 0.8, 2.5), ((1,), (0, -3.0), -0.6, 0.8, 2.5),  # brows down and together,
        ((3,), (0, 0), 0.0, 0.5, 2.0), ((4,), (0, 0), 0.0, 0.5, 2.0)],          # mouth corners down
    1: [((3,), (0, 0), -0.7, -0.8, 2.5), ((4,), (0, 0), 0.7, -0.8, 2.5),       # smile: corners up and out,
        ((0,), (0, 2), 0.0, -0.3, 2.0), ((1,), (0, 2), 0.0, -0.3, 2.0)],        # cheeks raised
    2: [((0,), (0, -3.0), 0.0, -1.0, 2.5), ((1,), (0, -3.0), 0.0, -1.0, 2.5),  # surprise: brows up,
        ((3, 4), (0, 2.5), 0.0, 0.9, 3.0)],                                     # jaw drops
}


def _bump(centre, sigma):
    yy, xx = np.mgrid[0:28, 0:28].astype(np.float32)
    return np.exp(-((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2) / (2 * sigma ** 2))


def _class_motion(label, points, amplitude):
    """Flow (u, v) for one expression; points: (5, 2) landmarks x, y of this face."""
    u, v = np.zeros((2, 28, 28), np.float32)
    for where, offset, du, dv, sigma in MOTIONS[label]:
        bump = _bump(points[list(where)].mean(axis=0) + offset, sigma) * amplitude
        u += du * bump
        v += dv * bump
    return u, v


def _smooth_noise(rng, sigma_px, scale):
    noise = rng.normal(0, 1, (28, 28)).astype(np.float32)
    noise = cv2.GaussianBlur(noise, (0, 0), sigma_px)
    return noise / (noise.std() + 1e-6) * scale


def make_synthetic(out_dir, subjects_per_dataset=4, samples_per_subject=(4, 9), seed=0,
                   signal=1.0):
    """A synthetic composite written to `out_dir` (returned); subjects_per_dataset: an int or a dict by dataset; signal:
    expression amplitude against noise (at 1.0 a small model beats chance well, yet lr and epochs matter)."""
    if isinstance(subjects_per_dataset, int):
        subjects_per_dataset = dict.fromkeys(CLASS_COUNTS, subjects_per_dataset)
    unknown = set(subjects_per_dataset) - set(CLASS_COUNTS)
    if unknown:
        raise UserError(f"unknown synthetic dataset {sorted(unknown)[0]!r} (known: casme2, smic, samm)")
    if any(n < 1 for n in subjects_per_dataset.values()):
        raise UserError("subjects_per_dataset must be at least 1 for each dataset")
    rng = np.random.default_rng(seed)
    rows, images, landmark_rows = [], [], []
    for dataset, n_subjects in subjects_per_dataset.items():
        shares = np.array(CLASS_COUNTS[dataset], float) / sum(CLASS_COUNTS[dataset])
        for s in range(n_subjects):
            sub = {"casme2": f"sub{s + 1:02d}", "smic": f"s{s + 1:02d}", "samm": f"{s + 6:03d}"}[dataset]
            face_shift, gain = rng.normal(0, 1.0, 2), rng.uniform(0.6, 1.4)
            head_motion, noise_level = rng.normal(0, 0.25, 2), rng.uniform(0.15, 0.3)
            n_samples = rng.integers(samples_per_subject[0], samples_per_subject[1] + 1)
            # Every subject shows every class once before drawing by the dataset's shares.
            labels = np.concatenate([rng.permutation(3), rng.choice(3, max(0, n_samples - 3), p=shares)])
            for k, label in enumerate(labels[:n_samples]):
                points = TEMPLATE_LANDMARKS + face_shift + rng.normal(0, 0.4, (5, 2))
                u, v = _class_motion(int(label), points, signal * gain * rng.uniform(0.5, 1.5))
                twitch = rng.uniform(4, 24, 2)  # a distractor movement somewhere on the face
                u += _bump(twitch, 2.0) * rng.normal(0, 0.5)
                v += _bump(twitch, 2.0) * rng.normal(0, 0.5)
                u += head_motion[0] + _smooth_noise(rng, 1.5, noise_level)
                v += head_motion[1] + _smooth_noise(rng, 1.5, noise_level)
                filename = f"syn{k + 1:02d}"
                rows.append({"dataset": dataset, "sub": sub, "filename_o": filename, "label": int(label)})
                images.append(flow_image(u, v))
                detected = rng.random() < 0.6  # like MTCNN, which misses some faces
                landmark_rows.append({"sample": f"{sub}_{filename}", "detected": int(detected),
                                      **dict(zip(LANDMARK_COLUMNS, points.ravel().round(4) if detected
                                                 else [np.nan] * 10))})
    write_release(out_dir, pd.DataFrame(rows), np.stack(images), pd.DataFrame(landmark_rows))
    return Path(out_dir)


def synthetic_cache(cache_dir=".cache/htnet-synth", subjects_per_dataset=4, seed=0):
    """The built-in synthetic set, generated once into `cache_dir` and reused."""
    folder = Path(cache_dir) / f"s{subjects_per_dataset}-seed{seed}"
    if not (folder / CSV_NAME).is_file():
        make_synthetic(folder, subjects_per_dataset=subjects_per_dataset, seed=seed)
    return folder
