"""The model registry, timm-style (`create_model("htnet", dim=64)`), and the argument checks the models share:
a bad configuration is one UserError line naming the argument, raised before any weights are built."""
import inspect
import math
import numbers

from htnet.errors import UserError

_REGISTRY = {}
INTERNAL = ("self", "groups")  # constructor arguments that are not configuration (groups: the engine's)


def register_model(name, input_kind):
    """Class decorator; input_kind: "face_crops" (four landmark crops tiled 2x2) or "whole_face"."""
    assert input_kind in ("face_crops", "whole_face"), input_kind

    def add(cls):
        _REGISTRY[name] = (cls, input_kind)
        return cls
    return add


def list_models():
    return sorted(_REGISTRY)


def _entry(name):
    if not isinstance(name, str) or name not in _REGISTRY:
        raise UserError(f"unknown model {name!r} (known: {', '.join(list_models())})")
    return _REGISTRY[name]


def model_input(name):
    """Which image the model `name` reads: "face_crops" or "whole_face"."""
    return _entry(name)[1]


def create_model(name, **config):
    cls, _ = _entry(name)
    accepted = inspect.signature(cls.__init__).parameters
    for key, value in config.items():
        if key not in accepted or key in INTERNAL:
            raise UserError(f"model {name} has no argument {key!r}")
        # each model checks its own arguments; a NaN or inf is refused for all (even unused ones)
        values = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, numbers.Real) and not math.isfinite(v) for v in values):
            raise UserError(f"{name}: {key} must be finite, got {value!r}")
    return cls(**config)


def positive_int(model, name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise UserError(f"{model}: {name} must be a positive integer, got {value!r}")
    return int(value)


def dropout_rate(model, name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
        raise UserError(f"{model}: {name} must be a number in [0, 1), got {value!r}")
    return float(value)
