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


def to_uint8(channel):
    """Min-max scaled to 0..255; a constant channel (no motion) is all zeros. ValueError if not finite."""
    low, high = float(channel.min()), float(channel.max())
    if not (np.isfinite(low) and np.isfinite(high)):
        raise ValueError("flow is not finite")
    if high - low < 1e-8:
        return np.zeros(channel.shape, np.uint8)
    return np.round((channel - low) / (high - low) * 255).astype(np.uint8)


def flow_image(u, v, strain=None):
    """(28, 28, 3) uint8 (strain, v, u) as cv2.imwrite stores it: each map resized to 28x28 (INTER_AREA)
    and scaled to 0..255 on its own; the strain computed from u, v unless given."""
    strain = optical_strain(u, v) if strain is None else strain
    channels = []
    for x in (strain, v, u):
        x = np.asarray(x, dtype=np.float32)
        if x.shape != (SIZE, SIZE):
            x = cv2.resize(x, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
        channels.append(to_uint8(x))
    return np.stack(channels, axis=-1)
