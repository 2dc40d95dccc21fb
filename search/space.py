"""A search space file: what a search samples, what it holds fixed, and how it runs.

    # search/spaces/demo.yaml
    num_samples: 6                 # trials (grid: at most the number of grid points)
    max_concurrent_trials: 2
    objective: inner               # inner (leak-free validation UF1) | paper (test-fold UF1)
    resources: {cpu: 1, gpu: 0}    # per trial; fractional GPUs pack trials: gpu: 0.25 -> 4 per GPU
    max_failures: 2                # retries of a trial whose worker died
    sampler: {type: tpe, seed: 0}  # tpe | random | grid, plus the Optuna sampler's arguments
    pruner: {type: median, n_startup_trials: 2, n_warmup_steps: 1}
    data: {synthetic_subjects: 2}  # the built-in synthetic set when no --data is given
    fixed:                         # LosoConfig keys held fixed (model_config.<key> for the model)
      epochs: 3
      model_config.num_hierarchies: {value: 1, when: "model == 'htnet'"}
    space:                         # sampled, in this order
      model: {choice: [htnet, ststnet]}
      lr: {low: 1.0e-4, high: 1.0e-2, log: true}      # float range, log scale
      batch_size: {choice: [16, 32]}
      model_config.dim: {choice: [16, 32], when: "model == 'htnet'"}
      model_config.heads: {low: 1, high: 4, when: "model == 'htnet'"}   # int range
    conditions:                    # must hold for every sampled configuration
      - model_config.dim % model_config.heads == 0
      - image_size % model_config.patch_size == 0

A parameter is a choice list (any YAML values, lists included), an int range (`low`/`high`
integers, optional `step`, `log`) or a float range (`log: true` for log scale; `type: int|float`
forces the kind). A plain value in `space` is fixed. `when` makes a parameter (or a fixed value)
apply only to some configurations. Expressions (`when`, `conditions`) use parameter names
(`model_config.dim`), `image_size` (28), numbers, strings, arithmetic, comparisons, `and`/`or`/
`not`, `in`, and len/min/max/abs.

Conditions are kept by construction, never by rejection: a condition filters the candidate
values of the last parameter it names (which must be a choice or an int range) given the values
sampled before it. Optuna needs a fixed set of choices per parameter name, so a parameter filtered
by earlier values is suggested to Optuna under a name that carries those values
(`model_config.heads|model_config.dim=112`); the trial sees the plain name.

`load_space(path)` raises `UserError` with one line naming the file and the key.
"""
import ast
import itertools
import json
import math
import operator
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from htnet.errors import UserError

BUILTINS = {"image_size": 28}
OBJECTIVES = {"inner": "inner_val_uf1", "paper": "paper_full_uf1"}
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "percentile", "successive_halving", "hyperband", "wilcoxon", "patient", "none")
TOP_KEYS = ("description", "num_samples", "max_concurrent_trials", "objective", "resources",
            "max_failures", "sampler", "pruner", "data", "fixed", "space", "conditions")
DATA_KEYS = ("synthetic_subjects", "synthetic_seed")
MAX_ENUMERATION = 100_000
SPACES_DIR = Path(__file__).resolve().parent / "spaces"


# ----------------------------------------------------------------------------- expressions

class _Missing(Exception):
    """A name the expression uses has no value in this configuration."""


_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
           ast.Pow: operator.pow}
_CMPOPS = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
           ast.Gt: operator.gt, ast.GtE: operator.ge, ast.In: lambda a, b: a in b,
           ast.NotIn: lambda a, b: a not in b}
_FUNCS = {"len": len, "min": min, "max": max, "abs": abs}


def _dotted(node):
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


class Expr:
    """A small, safe expression over parameter names (no Python eval)."""

    def __init__(self, text, where):
        self.text, self.where = str(text), where
        try:
            self.tree = ast.parse(self.text, mode="eval").body
        except SyntaxError:
            raise UserError(f"{where}: cannot parse expression {self.text!r}") from None
        self.names = set()
        self._check(self.tree)

    def _check(self, node):
        name = _dotted(node)
        if name is not None:
            if name not in _FUNCS:
                self.names.add(name)
            return
        if isinstance(node, ast.Constant):
            return
        if isinstance(node, (ast.List, ast.Tuple)):
            for item in node.elts:
                self._check(item)
        elif isinstance(node, ast.BoolOp):
            for item in node.values:
                self._check(item)
        elif isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            self._check(node.left)
            self._check(node.right)
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub, ast.UAdd)):
            self._check(node.operand)
        elif isinstance(node, ast.Compare) and all(type(op) in _CMPOPS for op in node.ops):
            self._check(node.left)
            for item in node.comparators:
                self._check(item)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                node.func.id in _FUNCS and not node.keywords:
            for item in node.args:
                self._check(item)
        else:
            raise UserError(f"{self.where}: {type(node).__name__} is not allowed in {self.text!r}")

    def __call__(self, env):
        try:
            return self._eval(self.tree, env)
        except _Missing:
            raise
        except (ArithmeticError, TypeError, ValueError) as e:
            raise UserError(f"{self.where}: {self.text!r} failed: {e}") from None

    def _eval(self, node, env):
        name = _dotted(node)
        if name is not None:
            if name not in env:
                raise _Missing(name)
            return env[name]
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.List):
            return [self._eval(item, env) for item in node.elts]
        if isinstance(node, ast.Tuple):
            return tuple(self._eval(item, env) for item in node.elts)
        if isinstance(node, ast.BoolOp):
            values = (self._eval(item, env) for item in node.values)
            return all(values) if isinstance(node.op, ast.And) else any(values)
        if isinstance(node, ast.BinOp):
            left, right = self._eval(node.left, env), self._eval(node.right, env)
            if isinstance(node.op, ast.Pow) and abs(right) > 64:
                raise ValueError("exponent too large")
            return _BINOPS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp):
            value = self._eval(node.operand, env)
            return {ast.Not: operator.not_, ast.USub: operator.neg, ast.UAdd: operator.pos}[type(node.op)](value)
        if isinstance(node, ast.Compare):
            left = self._eval(node.left, env)
            for op, comparator in zip(node.ops, node.comparators):
                right = self._eval(comparator, env)
                if not _CMPOPS[type(op)](left, right):
                    return False
                left = right
            return True
        if isinstance(node, ast.Call):
            return _FUNCS[node.func.id](*[self._eval(item, env) for item in node.args])
        raise AssertionError(node)

    def holds(self, env, missing=True):
        """The expression's truth; `missing` when a name it uses has no value."""
        try:
            return bool(self(env))
        except _Missing:
            return missing

    def __repr__(self):
        return self.text


# ----------------------------------------------------------------------------- parameters

def _optuna_value(value):
    """Optuna's choices must be None/bool/int/float/str: others travel as JSON text."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value)


@dataclass
class Param:
    name: str
    kind: str                       # choice | int | float
    choices: list | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    when: Expr | None = None
    conditions: list = field(default_factory=list)  # conditions that filter this parameter
    depends: list = field(default_factory=list)     # earlier parameters those conditions name
    where: str = ""                                 # "<file>: space.<name>", for messages

    def values(self):
        """All candidate values of a choice or int range."""
        if self.kind == "choice":
            return list(self.choices)
        if self.kind == "int":
            step = int(self.step or 1)
            count = (int(self.high) - int(self.low)) // step + 1
            if count > MAX_ENUMERATION:
                raise UserError(f"{self.where}: an int range of {count} values is too large to enumerate")
            return list(range(int(self.low), int(self.high) + 1, step))
        raise UserError(f"{self.where}: a float range cannot be enumerated (grid search or a "
                        f"condition needs a choice list or an int range)")

    def allowed(self, env):
        """Candidate values that satisfy this parameter's conditions, given earlier values."""
        out = []
        for value in self.values():
            trial_env = {**env, self.name: value}
            if all(c.holds(trial_env) for c in self.conditions):
                out.append(value)
        return out

    def suggest(self, trial, env):
        if self.conditions:
            allowed = self.allowed(env)
            if not allowed:
                context = ", ".join(f"{d}={env.get(d)!r}" for d in self.depends)
                raise UserError(f"{self.where}: no value satisfies the conditions when {context}")
            label = self.name
            if self.depends:
                label += "|" + ",".join(f"{d}={_optuna_value(env.get(d))}" for d in self.depends)
            encoded = [_optuna_value(v) for v in allowed]
            return allowed[encoded.index(trial.suggest_categorical(label, encoded))]
        if self.kind == "choice":
            encoded = [_optuna_value(v) for v in self.choices]
            return self.choices[encoded.index(trial.suggest_categorical(self.name, encoded))]
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high),
                                     step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high),
                                   step=self.step, log=self.log)


@dataclass
class Fixed:
    name: str
    value: object
    when: Expr | None = None


# ----------------------------------------------------------------------------- the space

@dataclass
class SearchSpace:
    source: str
    params: list
    fixed: list
    conditions: list
    num_samples: int = 10
    max_concurrent_trials: int = 2
    objective: str = "inner"
    resources: dict = field(default_factory=lambda: {"cpu": 1.0, "gpu": 0.0})
    max_failures: int = 2
    sampler: dict = field(default_factory=lambda: {"type": "tpe", "seed": 0})
    pruner: dict = field(default_factory=lambda: {"type": "median"})
    data: dict = field(default_factory=lambda: {"synthetic_subjects": 4, "synthetic_seed": 0})
    description: str = ""
    raw: dict = field(default_factory=dict)

    @property
    def names(self):
        return [p.name for p in self.params]

    @property
    def metric(self):
        return OBJECTIVES[self.objective]

    # -- sampling

    def sample(self, trial):
        """Define-by-run for Optuna: suggest every applicable parameter; return the values.

        Suggestions go to the Optuna trial itself (OptunaSearch passes a wrapper whose captured
        values would become the Ray config): the Ray config is exactly the returned values,
        under their plain names, while Optuna records filtered parameters under their
        context names and non-scalar choices as JSON text."""
        trial = getattr(trial, "ot_trial", trial)
        env, values = dict(BUILTINS), {}
        for item in self.fixed:
            if item.when is None:
                env[item.name] = item.value
        for param in self.params:
            if param.when is not None and not param.when.holds(env, missing=False):
                continue
            env[param.name] = values[param.name] = param.suggest(trial, env)
        return values

    def optuna_space(self):
        """What OptunaSearch(space=...) takes: a define-by-run function."""
        if self.sampler["type"] == "grid":
            return self.sample_grid_point
        return self.sample

    def grid_points(self):
        """Every valid configuration of an all-discrete space, in a stable order."""
        points = [{}]
        for param in self.params:
            grown = []
            for point in points:
                env = {**BUILTINS, **{f.name: f.value for f in self.fixed if f.when is None}, **point}
                if param.when is not None and not param.when.holds(env, missing=False):
                    grown.append(point)
                    continue
                for value in (param.allowed(env) if param.conditions else param.values()):
                    grown.append({**point, param.name: value})
            points = grown
            if len(points) > MAX_ENUMERATION:
                raise UserError(f"{self.source}: the grid has more than {MAX_ENUMERATION} points")
        return points

    @staticmethod
    def grid_label(point):
        return ", ".join(f"{k}={_optuna_value(v)}" for k, v in point.items()) or "(fixed)"

    def sample_grid_point(self, trial):
        trial = getattr(trial, "ot_trial", trial)
        points = self.grid_points()
        labels = [self.grid_label(p) for p in points]
        return dict(points[labels.index(trial.suggest_categorical("grid_point", labels))])

    def grid_search_space(self):
        return {"grid_point": [self.grid_label(p) for p in self.grid_points()]}

    # -- configurations

    def sampled(self, config):
        """The sampled values (plain names) out of a Ray Tune trial config."""
        return {name: config[name] for name in self.names if name in config}

    def resolve(self, sampled, overrides=None):
        """Sampled values + fixed values -> a LosoConfig dict (model_config nested)."""
        env = {**BUILTINS, **sampled}
        flat = {}
        for item in self.fixed:
            if item.when is None:
                env[item.name] = flat[item.name] = item.value
        for item in self.fixed:
            if item.when is not None and item.when.holds(env, missing=False):
                env[item.name] = flat[item.name] = item.value
        flat.update(sampled)
        flat.update(overrides or {})
        return nest(flat)

    def make_sampler(self):
        import optuna

        options = {k: v for k, v in self.sampler.items() if k != "type"}
        kind = self.sampler["type"]
        try:
            if kind == "tpe":
                return optuna.samplers.TPESampler(**options)
            if kind == "random":
                return optuna.samplers.RandomSampler(**options)
            return optuna.samplers.GridSampler(self.grid_search_space(), **options)
        except TypeError as e:
            raise UserError(f"{self.source}: sampler: {e}") from None

    def make_pruner(self):
        return make_pruner(self.pruner, f"{self.source}: pruner")


def make_pruner(spec, where):
    import optuna

    spec = dict(spec)
    kind = spec.pop("type", "median")
    classes = {"median": optuna.pruners.MedianPruner, "percentile": optuna.pruners.PercentilePruner,
               "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
               "hyperband": optuna.pruners.HyperbandPruner, "wilcoxon": optuna.pruners.WilcoxonPruner,
               "none": optuna.pruners.NopPruner}
    if kind not in classes and kind != "patient":
        raise UserError(f"{where}: unknown type {kind!r} (known: {', '.join(PRUNERS)})")
    # Wilcoxon ("experimental since v3.6.0") and Patient ("since v2.8") are stable in use
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            if kind == "patient":
                wrapped = spec.pop("wrapped", None)
                if wrapped is not None and not isinstance(wrapped, dict):
                    raise UserError(f"{where}.wrapped: expected a mapping like {{type: median}}")
                inner = make_pruner(wrapped, f"{where}.wrapped") if wrapped else None
                if "patience" not in spec:
                    raise UserError(f"{where}: patient needs 'patience' (reports without improvement)")
                return optuna.pruners.PatientPruner(inner, **spec)
            return classes[kind](**spec)
        except (TypeError, ValueError) as e:
            raise UserError(f"{where}: {e}") from None


def pairs_folds(pruner):
    """True for a pruner that compares trials fold by fold: Wilcoxon, whose instances are the LOSO
    folds (the same subjects in every trial), tested pairwise against the best trial."""
    import optuna

    return isinstance(pruner, optuna.pruners.WilcoxonPruner)


def fold_objectives(progress, metric):
    """[[fold number, that fold's own objective], ...] for the folds an engine report adds."""
    return [[f["fold"], float(f[metric])] for f in progress.get("folds", [])
            if isinstance(f.get(metric), (int, float)) and math.isfinite(f[metric])]


def pruner_steps(pruner, step, value, folds):
    """The (step, value) pairs one LOSO report gives the pruner: the pooled objective at step = folds
    done, or, for a pruner that pairs folds, each new fold's own objective at step = its fold number."""
    return [(int(f), float(v)) for f, v in folds] if pairs_folds(pruner) else [(int(step), float(value))]


def report_loso_step(trial, pruner, step, value, folds):
    """Report one LOSO report to an Optuna trial (see pruner_steps)."""
    for at, reported in pruner_steps(pruner, step, value, folds):
        trial.report(reported, at)


def nest(flat):
    """{'model_config.dim': 16, 'lr': 1e-3} -> {'model_config': {'dim': 16}, 'lr': 1e-3}."""
    out = {}
    for key, value in flat.items():
        if key.startswith("model_config."):
            out.setdefault("model_config", {})[key.split(".", 1)[1]] = value
        elif key == "model_config":
            out.setdefault("model_config", {}).update(value or {})
        else:
            out[key] = value
    return out


def flatten(config, prefix=""):
    """Nested config -> {'model_config.dim': 16, ...} (for MLflow params)."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


# ----------------------------------------------------------------------------- loading

def _known_config_keys():
    import dataclasses

    from htnet.loso import LosoConfig

    return {f.name for f in dataclasses.fields(LosoConfig)}


def _known_models():
    try:
        from htnet.models import list_models
        return list(list_models())
    except ImportError:  # the model registry is not importable: leave model names unchecked
        return None


def _number(value, where, what):
    """YAML 1.1 reads 1e-4 (no dot) as a string: accept numeric text too."""
    if isinstance(value, bool):
        raise UserError(f"{where}: {what} must be a number, got {value!r}")
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
        else:
            return int(number) if number.is_integer() and "." not in value and "e" not in value.lower() else number
    raise UserError(f"{where}: {what} must be a number, got {value!r}")


def _check_key(name, where, config_keys):
    if name.startswith("model_config."):
        if not name.split(".", 1)[1]:
            raise UserError(f"{where}: empty model_config key")
        return
    if name == "model_config":
        raise UserError(f"{where}: give model arguments one by one as model_config.<name>")
    if name not in config_keys:
        raise UserError(f"{where}: unknown key {name!r} (LOSO config keys: {', '.join(sorted(config_keys))}, "
                        f"model_config.<name>)")


def _parse_param(name, spec, where):
    allowed = {"choice", "low", "high", "log", "step", "type", "when"}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(allowed))})")
    if "choice" in spec:
        extra = sorted(set(spec) & {"low", "high", "log", "step", "type"})
        if extra:
            raise UserError(f"{where}: {extra[0]!r} does not go with 'choice'")
        choices = spec["choice"]
        if not isinstance(choices, list):
            raise UserError(f"{where}.choice: expected a list, got {choices!r}")
        if not choices:
            raise UserError(f"{where}.choice: empty choice list")
        encoded = [_optuna_value(v) for v in choices]
        if len(set(map(repr, encoded))) != len(encoded):
            raise UserError(f"{where}.choice: repeated value in {choices!r}")
        return Param(name, "choice", choices=list(choices))
    for bound in ("low", "high"):
        if bound not in spec:
            raise UserError(f"{where}: needs 'choice', or 'low' and 'high' (missing {bound!r})")
    low = _number(spec["low"], where, "low")
    high = _number(spec["high"], where, "high")
    kind = spec.get("type")
    if kind is None:
        kind = "int" if isinstance(low, int) and isinstance(high, int) else "float"
    if kind not in ("int", "float"):
        raise UserError(f"{where}.type: expected int or float, got {kind!r}")
    if kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
        raise UserError(f"{where}: an int range needs integer low and high")
    if low > high:
        raise UserError(f"{where}: low {low} > high {high}")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise UserError(f"{where}.log: expected true or false, got {log!r}")
    if log and low <= 0:
        raise UserError(f"{where}: log scale needs low > 0, got {low}")
    step = spec.get("step")
    if step is not None:
        step = _number(step, where, "step")
        if step <= 0:
            raise UserError(f"{where}.step: must be > 0, got {step}")
        if log:
            raise UserError(f"{where}: 'step' does not go with 'log'")
        if kind == "int" and not float(step).is_integer():
            raise UserError(f"{where}.step: an int range needs an integer step")
    if kind == "int":
        low, high = int(low), int(high)
        step = int(step) if step is not None else None
    else:
        low, high = float(low), float(high)
    return Param(name, kind, low=low, high=high, log=log, step=step)


def _check_models(space, models, source):
    if models is None:
        return
    for param in space.params:
        if param.name == "model" and param.kind == "choice":
            for value in param.choices:
                if value not in models:
                    raise UserError(f"{source}: space.model: unknown model {value!r} (known: {', '.join(models)})")
        elif param.name == "model":
            raise UserError(f"{source}: space.model: must be a choice list of model names")
    for item in space.fixed:
        if item.name == "model" and item.value not in models:
            raise UserError(f"{source}: fixed.model: unknown model {item.value!r} (known: {', '.join(models)})")


def parse_space(raw, source="<space>"):
    """A mapping (the YAML file's content) -> SearchSpace; UserError names the first bad key."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{source}: expected a mapping at the top level")
    for key in raw:
        if key not in TOP_KEYS:
            raise UserError(f"{source}: unknown key {key!r} (known: {', '.join(TOP_KEYS)})")
    config_keys = _known_config_keys()
    settings = {}

    def positive_int(key, minimum=1):
        if key not in raw:
            return
        value = raw[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise UserError(f"{source}: {key}: expected an integer >= {minimum}, got {value!r}")
        settings[key] = value

    positive_int("num_samples")
    positive_int("max_concurrent_trials")
    positive_int("max_failures", minimum=0)
    if "description" in raw:
        settings["description"] = str(raw["description"])
    if "objective" in raw:
        if raw["objective"] not in OBJECTIVES:
            raise UserError(f"{source}: objective: expected one of {', '.join(OBJECTIVES)}, got {raw['objective']!r}")
        settings["objective"] = raw["objective"]

    if "resources" in raw:
        resources = raw["resources"]
        if not isinstance(resources, dict):
            raise UserError(f"{source}: resources: expected a mapping like {{cpu: 1, gpu: 0.25}}")
        out = {"cpu": 1.0, "gpu": 0.0}
        for key, value in resources.items():
            if key not in out:
                raise UserError(f"{source}: resources: unknown key {key!r} (known: cpu, gpu)")
            value = _number(value, f"{source}: resources.{key}", key)
            if value < 0 or (key == "cpu" and value <= 0):
                raise UserError(f"{source}: resources.{key}: must be {'> 0' if key == 'cpu' else '>= 0'}, got {value}")
            out[key] = float(value)
        settings["resources"] = out

    for key, choices in (("sampler", SAMPLERS), ("pruner", PRUNERS)):
        if key not in raw:
            continue
        spec = raw[key]
        if isinstance(spec, str):
            spec = {"type": spec}
        if not isinstance(spec, dict):
            raise UserError(f"{source}: {key}: expected a mapping like {{type: {choices[0]}}}")
        spec = dict(spec)
        spec.setdefault("type", choices[0])
        if key == "sampler":
            spec.setdefault("seed", 0)  # seeded unless the file says otherwise (seed: null)
        if spec["type"] not in choices:
            raise UserError(f"{source}: {key}.type: unknown {key} {spec['type']!r} (known: {', '.join(choices)})")
        settings[key] = spec

    if "data" in raw:
        data = raw["data"]
        if not isinstance(data, dict):
            raise UserError(f"{source}: data: expected a mapping like {{synthetic_subjects: 2}}")
        out = {"synthetic_subjects": 4, "synthetic_seed": 0}
        for key, value in data.items():
            if key not in DATA_KEYS:
                raise UserError(f"{source}: data: unknown key {key!r} (known: {', '.join(DATA_KEYS)})")
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if key == "synthetic_subjects" else 0):
                raise UserError(f"{source}: data.{key}: expected a non-negative integer, got {value!r}")
            out[key] = value
        settings["data"] = out

    # fixed values: the `fixed` section, and plain values in `space`
    fixed, params = [], []
    fixed_raw = raw.get("fixed") or {}
    space_raw = raw.get("space") or {}
    for section, content in (("fixed", fixed_raw), ("space", space_raw)):
        if not isinstance(content, dict):
            raise UserError(f"{source}: {section}: expected a mapping of parameter names")
    seen = {}
    for name, spec in fixed_raw.items():
        where = f"{source}: fixed.{name}"
        _check_key(str(name), where, config_keys)
        when = None
        if isinstance(spec, dict) and "value" in spec:
            unknown = sorted(set(spec) - {"value", "when"})
            if unknown:
                raise UserError(f"{where}: unknown key {unknown[0]!r} (known: value, when)")
            when = Expr(spec["when"], f"{where}.when") if "when" in spec else None
            spec = spec["value"]
        elif isinstance(spec, dict):
            raise UserError(f"{where}: a fixed value that is a mapping needs the form {{value: ..., when: ...}}")
        fixed.append(Fixed(str(name), spec, when))
        seen[str(name)] = "fixed"
    for name, spec in space_raw.items():
        name = str(name)
        where = f"{source}: space.{name}"
        _check_key(name, where, config_keys)
        if name in seen:
            raise UserError(f"{where}: also given in {seen[name]}")
        if isinstance(spec, dict) and not ({"choice", "low", "high"} & set(spec)) and "value" in spec:
            unknown = sorted(set(spec) - {"value", "when"})
            if unknown:
                raise UserError(f"{where}: unknown key {unknown[0]!r} (known: value, when)")
            fixed.append(Fixed(name, spec["value"], Expr(spec["when"], f"{where}.when") if "when" in spec else None))
        elif isinstance(spec, dict):
            param = _parse_param(name, spec, where)
            param.where = where
            if "when" in spec:
                param.when = Expr(spec["when"], f"{where}.when")
            params.append(param)
        else:
            fixed.append(Fixed(name, spec))
        seen[name] = "space"

    # `when` may only use names defined before (fixed values, earlier parameters, builtins)
    defined = set(BUILTINS) | {f.name for f in fixed}
    for param in params:
        if param.when is not None:
            unknown = sorted(param.when.names - defined)
            if unknown:
                raise UserError(f"{source}: space.{param.name}.when: {unknown[0]!r} is not a fixed value "
                                f"or a parameter defined before {param.name}")
        defined.add(param.name)
    for item in fixed:
        if item.when is not None:
            unknown = sorted(item.when.names - defined)
            if unknown:
                raise UserError(f"{source}: {item.name}.when: unknown name {unknown[0]!r}")

    # conditions
    conditions_raw = raw.get("conditions") or []
    if not isinstance(conditions_raw, list):
        raise UserError(f"{source}: conditions: expected a list of expressions")
    order = {p.name: i for i, p in enumerate(params)}
    by_name = {p.name: p for p in params}
    static_env = {**BUILTINS, **{f.name: f.value for f in fixed if f.when is None}}
    conditions = []
    for i, text in enumerate(conditions_raw):
        where = f"{source}: conditions[{i}]"
        if not isinstance(text, str):
            raise UserError(f"{where}: expected an expression string, got {text!r}")
        expr = Expr(text, where)
        unknown = sorted(expr.names - defined)
        if unknown:
            raise UserError(f"{where}: unknown name {unknown[0]!r} in {text!r}")
        conditions.append(expr)
        sampled = sorted((n for n in expr.names if n in order), key=order.get)
        if not sampled:
            if not expr.holds(static_env):
                raise UserError(f"{where}: {text!r} is false for the fixed values")
            continue
        target = by_name[sampled[-1]]
        if target.kind == "float":
            raise UserError(f"{where}: {target.name} is a float range; the last parameter a condition "
                            f"names must be a choice list or an int range")
        target.conditions.append(expr)
        for dep in sampled[:-1]:
            if dep not in target.depends:
                target.depends.append(dep)
        target.depends.sort(key=order.get)

    space = SearchSpace(source=source, params=params, fixed=fixed, conditions=conditions, raw=raw,
                        **settings)
    _check_models(space, _known_models(), source)
    _check_conditions_satisfiable(space)
    _check_objective(space)
    _check_fixed_values(space, f"{source}: fixed")
    if space.sampler["type"] == "grid":
        points = space.grid_points()
        if not points:
            raise UserError(f"{source}: the grid is empty")
    space.make_pruner()   # bad pruner arguments fail here, not in the middle of a search
    space.make_sampler()
    return space


def _check_conditions_satisfiable(space):
    """Every combination of earlier discrete values must leave a filtered parameter a value."""
    static_env = {**BUILTINS, **{f.name: f.value for f in space.fixed if f.when is None}}
    by_name = {p.name: p for p in space.params}
    for param in space.params:
        if not param.conditions:
            continue
        deps = [by_name[d] for d in param.depends]
        if any(d.kind == "float" for d in deps):
            continue
        combos = itertools.product(*[d.values() for d in deps])
        for combo in itertools.islice(combos, MAX_ENUMERATION):
            env = {**static_env, **{d.name: v for d, v in zip(deps, combo)}}
            if not param.allowed(env):
                context = ", ".join(f"{d.name}={v!r}" for d, v in zip(deps, combo)) or "the fixed values"
                raise UserError(f"{space.source}: space.{param.name}: no value satisfies the conditions "
                                f"when {context}")


def _check_fixed_values(space, where, model=True):
    """What every trial gets is checked once, before any trial runs: the fixed LOSO values (those
    without `when`), so that `epochs: 0` or `protocols: [best]` stops the search at the start; and,
    where nothing about the model is sampled or conditional, the model itself (built on the meta
    device: no memory, no time), so that an impossible fixed model config does too."""
    import torch

    from htnet.loso import LosoConfig

    def model_key(name):
        return name == "model" or name == "model_config" or name.startswith("model_config.")

    values = {f.name: f.value for f in space.fixed if f.when is None and not model_key(f.name)}
    if "protocols" in space.names:  # inner_val_subjects only matters where a sample has 'inner'
        values.pop("inner_val_subjects", None)
    model_fixed = model and not any(model_key(n) for n in space.names) and \
        not any(model_key(f.name) and f.when is not None for f in space.fixed)
    model_values = {"model": "ststnet", "model_config": {}}
    if model_fixed:
        model_values = {"model": "htnet", **nest({f.name: f.value for f in space.fixed if model_key(f.name)})}
        model_values.setdefault("model_config", {})
    try:
        with torch.device("meta"):
            LosoConfig.from_dict({**values, **model_values})
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    except (TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{where}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def check_fixed_values(space, where):
    """The check of parse_space, again after `--set` (which may complete or break the model)."""
    _check_fixed_values(space, where)


def _check_objective(space):
    fixed = {f.name: f.value for f in space.fixed if f.when is None}
    protocols = fixed.get("protocols")
    if protocols is None or "protocols" in space.names:
        return
    if isinstance(protocols, str):
        protocols = [protocols]
    needed = space.objective
    if needed not in protocols:
        raise UserError(f"{space.source}: fixed.protocols: the {needed!r} objective needs the {needed!r} "
                        f"protocol, got {list(protocols)}")


def load_space(path):
    """Read and check a search space YAML file (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        named = SPACES_DIR / f"{path.name}.yaml" if path.suffix == "" else None
        if named is not None and named.is_file():
            path = named
        else:
            raise UserError(f"search space file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{path}:{where}: not valid YAML ({problem})") from None
    return parse_space(raw, str(path))


def with_overrides(space, **overrides):
    """A copy of `space` with search settings replaced (CLI flags); None leaves one as it is."""
    import copy

    space = copy.deepcopy(space)
    for key, value in overrides.items():
        if value is None:
            continue
        if key in ("sampler", "pruner"):
            current = getattr(space, key)
            if value != current["type"]:  # another kind: the file's arguments do not apply to it
                setattr(space, key, {"type": value, **({"seed": current["seed"]} if "seed" in current else {})})
        elif key == "seed":
            space.sampler = {**space.sampler, "seed": value}
        elif key == "resources":
            space.resources = {**space.resources, **value}
        else:
            setattr(space, key, value)
    if space.objective not in OBJECTIVES:
        raise UserError(f"--objective: expected one of {', '.join(OBJECTIVES)}, got {space.objective!r}")
    if space.sampler["type"] not in SAMPLERS:
        raise UserError(f"--sampler: expected one of {', '.join(SAMPLERS)}, got {space.sampler['type']!r}")
    _check_objective(space)
    space.make_pruner()
    space.make_sampler()
    return space


def set_fixed(space, assignments):
    """Apply `--set KEY=VALUE` (YAML values) to the fixed values of a copy of `space`."""
    import copy

    if not assignments:
        return space
    space = copy.deepcopy(space)
    config_keys = _known_config_keys()
    for text in assignments:
        key, sep, value = str(text).partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"--set {text!r}: expected KEY=VALUE")
        _check_key(key, f"--set {key}", config_keys)
        if key in space.names:
            raise UserError(f"--set {key}: {key} is sampled by the space; edit the space file instead")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UserError(f"--set {key}: cannot read value {value!r}") from None
        space.fixed = [f for f in space.fixed if f.name != key] + [Fixed(key, parsed)]
    _check_objective(space)
    _check_fixed_values(space, "--set", model=False)  # the model: check_fixed_values, once all is set
    return space


def describe(space):
    """One line per parameter, for --help style listings and the search log."""
    lines = []
    for p in space.params:
        if p.kind == "choice":
            text = f"choice {p.choices}"
        else:
            text = f"{p.kind} [{p.low}, {p.high}]" + (" log" if p.log else "") + (f" step {p.step}" if p.step else "")
        if p.when is not None:
            text += f" when {p.when}"
        lines.append(f"  {p.name}: {text}")
    for f in space.fixed:
        lines.append(f"  {f.name} = {f.value!r}" + (f" when {f.when}" if f.when is not None else ""))
    for c in space.conditions:
        lines.append(f"  condition: {c}")
    return "\n".join(lines)


def is_finite_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
