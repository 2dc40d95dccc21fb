"""HTNet's input: 14x14 patches around the eyes (landmarks 0, 1; top row) and mouth corners (3, 4), tiled 2x2,
centres clamped to 7..21 and truncated. "reference" indexes image[x-7:x+7, y-7:y+7] (x as the row) as the
reference does (the published numbers); "corrected" indexes image[y-7:y+7, x-7:x+7]."""
import numpy as np

from htnet.errors import UserError

CROP_MODES = ("reference", "corrected")
TILE_POINTS = [0, 1, 3, 4]  # top-left, top-right, bottom-left, bottom-right
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
    centres = patch_centres(landmarks)[:, TILE_POINTS]
    rows, cols = (centres[..., 0], centres[..., 1]) if crop_mode == "reference" else (centres[..., 1], centres[..., 0])
    window = np.arange(-HALF, HALF)
    n = len(images)
    # patches[n, tile, i, j, channel] = images[n, channel, rows[n, tile] + i - 7, cols[n, tile] + j - 7]
    patches = images[np.arange(n)[:, None, None, None], :, (rows[..., None] + window)[..., None],
                     (cols[..., None] + window)[..., None, :]]
    return patches.reshape(n, 2, 2, 14, 14, 3).transpose(0, 5, 1, 3, 2, 4).reshape(n, 3, 28, 28)
