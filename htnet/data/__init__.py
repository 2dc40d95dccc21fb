"""Release files -> CompositeData (numpy), and the model inputs cut from it."""
from htnet.data.crops import CROP_MODES, htnet_input
from htnet.data.release import CompositeData, load_release, write_release
from htnet.data.synth import make_synthetic, synthetic_cache

__all__ = ["CROP_MODES", "CompositeData", "htnet_input", "load_release", "make_synthetic",
           "synthetic_cache", "write_release"]
