"""Opt-in C kernels (HTNET_CPU_KERNELS=1) for the grouped STSTNet's CPU stem (stem.c), built once with the
system C compiler into ~/.cache/htnet/kernels and called through ctypes; off or uncompilable: PyTorch."""
import concurrent.futures
import contextlib
import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("stem.c")


def cpu_kernels():
    """The ctypes library of the stem kernels, or None where it is off or cannot be had."""
    on = os.environ.get("HTNET_CPU_KERNELS", "0") == "1" and sys.platform.startswith("linux")
    return _built() if on else None


@functools.cache
def _built():
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        return None
    flags = ["-O3", "-fno-trapping-math", "-shared", "-fPIC"]
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = f.read(100_000)
        flags += ["-mavx2", "-mfma"] if " avx2" in cpu and " fma" in cpu else []
    source = SOURCE.read_text()
    digest = hashlib.sha256((source + " ".join(flags) + compiler).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "htnet" / "kernels"
    target = cache / f"stem-{digest}.so"
    try:
        if not target.exists():
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                built = Path(tmp) / "stem.so"
                subprocess.run([compiler, *flags, "-o", str(built), str(SOURCE)], check=True,
                               capture_output=True, timeout=120)
                os.replace(built, target)   # atomic: concurrent workers may build it too
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError):
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.stem_forward.argtypes = [ptr, i64, i64, i64, i64, i64, ptr, ptr, ptr, ptr]
    lib.stem_backward.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64]
    lib.stem_forward.restype = lib.stem_backward.restype = None
    return lib


_pool = functools.cache(concurrent.futures.ThreadPoolExecutor)


def _split(batch, fn):
    """Run fn(b0, b1) over the batch, split across torch's thread count (ctypes drops the GIL)."""
    threads = min(torch.get_num_threads(), batch)
    if threads <= 1:
        fn(0, batch)
        return
    bounds = [batch * i // threads for i in range(threads + 1)]
    list(_pool(threads).map(lambda i: fn(bounds[i], bounds[i + 1]), range(threads)))


def stem_forward(lib, z):
    B, C, H, W = z.shape
    s1, s2 = torch.empty(B, C), torch.empty(B, C)
    pooled = (B, C, (H - 1) // 3 + 1, (W - 1) // 3 + 1)
    pmax = torch.empty(pooled, memory_format=torch.channels_last)
    idx = torch.empty(pooled, dtype=torch.int32, memory_format=torch.channels_last)
    _split(B, lambda b0, b1: lib.stem_forward(z.data_ptr(), b0, b1, H, W, C, s1.data_ptr(), s2.data_ptr(),
                                              pmax.data_ptr(), idx.data_ptr()))
    return s1, s2, pmax, idx


def stem_backward(lib, z, idx, dpmax, ds1, ds2):
    B, C, H, W = z.shape
    dz = torch.empty(z.shape, memory_format=torch.channels_last)
    dp = dpmax.to(torch.float32).contiguous(memory_format=torch.channels_last)
    ds1, ds2 = ds1.float().contiguous(), ds2.float().contiguous()
    _split(B, lambda b0, b1: lib.stem_backward(z.data_ptr(), idx.data_ptr(), dp.data_ptr(), ds1.data_ptr(),
                                               ds2.data_ptr(), dz.data_ptr(), b0, b1, H, W, C))
    return dz


def applies_to(z):
    return (z.device.type == "cpu" and z.dtype == torch.float32 and z.dim() == 4
            and z.is_contiguous(memory_format=torch.channels_last) and z.shape[1] <= 4096)
