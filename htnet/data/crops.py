"""HTNet's input: four 14x14 patches around landmarks 0, 1 (eyes; top row) and 3, 4 (mouth corners),
tiled 2x2. Centres are clamped to 7..21 and truncated, as the reference does. crop_mode "reference"
indexes image[x-7:x+7, y-7:y+7] as the reference does (x as the row: the published numbers);
"corrected" indexes image[y-7:y+7, x-7:x+7], centred on the landmarks as intended."""
import numpy as np

from htnet.errors import UserError

CROP_MODES = ("reference", "corrected")
TILE_POINTS = ((0, 1), (3, 4))
HALF = 7


def patch_centres(landmarks):
    """(N, 5, 2) float landmarks -> (N, 5, 2) int centres, clamped to 7..21 and truncated."""
    return np.clip(landmarks, HALF, 28 - HALF).astype(int)


def htnet_input(images, landmarks, crop_mode="reference"):
    """(N, 3, 28, 28) whole-face images + (N, 5, 2) landmarks -> (N, 3, 28, 28) tiled crops."""
    if not isinstance(crop_mode, str) or crop_mode not in CROP_MODES:
        raise UserError(f"unknown crop_mode {crop_mode!r} (known: {', '.join(CROP_MODES)})")
    if images.ndim != 4 or images.shape[1:] != (3, 28, 28) or landmarks.shape != (len(images), 5, 2):
        raise UserError(f"htnet_input needs (N, 3, 28, 28) images and (N, 5, 2) landmarks, "
                        f"got {images.shape} and {landmarks.shape}")
    if not np.isfinite(landmarks).all():  # NaN would become a garbage int index below
        raise UserError(f"landmarks of sample {int(np.argmax(~np.isfinite(landmarks).all(axis=(1, 2))))} "
                        f"(0-based) are not finite")
    centres = patch_centres(landmarks)
    if crop_mode == "reference":
        rows, cols = centres[..., 0], centres[..., 1]
    else:
        rows, cols = centres[..., 1], centres[..., 0]
    out = np.empty_like(images)
    for n in range(len(images)):
        for tile_row, points in enumerate(TILE_POINTS):
            for tile_col, p in enumerate(points):
                r, c = rows[n, p], cols[n, p]
                out[n, :, tile_row * 14:(tile_row + 1) * 14, tile_col * 14:(tile_col + 1) * 14] = \
                    images[n, :, r - HALF:r + HALF, c - HALF:c + HALF]
    return out
