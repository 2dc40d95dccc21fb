"""Optical flow -> the release's image: optical strain, per-channel 0..255 scaling, cv2's channel order."""
import cv2
import numpy as np

SIZE = 28


def optical_strain(u, v):
    """sqrt(e_xx^2 + e_yy^2 + 2 e_xy^2), e_xy = (du/dy + dv/dx) / 2, in the inputs' precision (>= float32)."""
    dtype = np.result_type(u, v, np.float32)
    du_dy, du_dx = np.gradient(np.asarray(u, dtype=dtype))
    dv_dy, dv_dx = np.gradient(np.asarray(v, dtype=dtype))
    e_xy = (du_dy + dv_dx) / 2
    return np.sqrt(du_dx ** 2 + dv_dy ** 2 + 2 * e_xy ** 2)


def flow_image(u, v, strain=None):
    """(28, 28, 3) uint8 (strain, v, u) as cv2.imwrite stores it: each map resized to 28x28 (INTER_AREA), min-max
    scaled to 0..255 on its own (a constant map is all zeros); strain from u, v unless given; ValueError: not finite."""
    strain = optical_strain(u, v) if strain is None else strain
    channels = []
    for x in (strain, v, u):
        x = np.asarray(x, dtype=np.float32)
        if x.shape != (SIZE, SIZE):
            x = cv2.resize(x, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
        low, high = float(x.min()), float(x.max())
        if not (np.isfinite(low) and np.isfinite(high)):
            raise ValueError("flow is not finite")
        span = high - low
        channels.append(np.round((x - low) / span * 255) if span >= 1e-8 else np.zeros_like(x))
    return np.stack(channels, axis=-1).astype(np.uint8)
