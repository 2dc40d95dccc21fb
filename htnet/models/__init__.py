"""Models by name, timm-style: `create_model("htnet", dim=64)`.

Each entry says which input it reads: "face_crops" (four landmark crops tiled 2x2, HTNet) or
"whole_face" (the whole-face flow image, STSTNet). Every model maps (B, 3, 28, 28) to
(B, num_classes) logits.
"""
import inspect

from htnet.errors import UserError

_REGISTRY = {}


def register_model(name, input_kind):
    def add(cls):
        _REGISTRY[name] = (cls, input_kind)
        return cls
    return add


def list_models():
    return sorted(_REGISTRY)


def _entry(name):
    if name not in _REGISTRY:
        raise UserError(f"unknown model {name!r} (known: {', '.join(list_models())})")
    return _REGISTRY[name]


def model_input(name):
    return _entry(name)[1]


def create_model(name, **config):
    cls, _ = _entry(name)
    accepted = inspect.signature(cls.__init__).parameters
    for key in config:
        if key not in accepted or key == "self":
            raise UserError(f"model {name} has no argument {key!r}")
    return cls(**config)


from htnet.models import htnet, ststnet  # noqa: E402,F401  (registration)
