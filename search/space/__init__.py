"""Search space files: schema (the format, parsing, checks), expressions (`when`, conditions), sampling (Optuna)."""
from search.space.sampling import PRUNERS, flatten, make_pruner, nest, trial_config
from search.space.schema import (SPACES_DIR, SearchSpace, check_fixed_values, check_value, load_space, parse_set,
                                 parse_space, set_fixed, with_overrides)

__all__ = ["PRUNERS", "SPACES_DIR", "SearchSpace", "check_fixed_values", "check_value", "flatten", "load_space",
           "make_pruner", "nest", "parse_set", "parse_space", "set_fixed", "trial_config", "with_overrides"]
