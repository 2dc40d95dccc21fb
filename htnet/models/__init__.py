"""Models by name, timm-style: `create_model("htnet", dim=64)` (htnet.models.registry); one model
per file (htnet.models.htnet, .ststnet, .offapexnet, .dual_inception), registered on import."""
from htnet.models.registry import create_model, list_models, model_input, register_model  # noqa: F401
from htnet.models import dual_inception, htnet, offapexnet, ststnet  # noqa: E402,F401  (registration)
