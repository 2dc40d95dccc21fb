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
`not`, `in`, and len/min/max/abs. Their cost is bounded: at most 1000 characters, 200 nodes, 32
deep; integers of at most 128 bits, strings of 256 characters, lists of 1000 values (a power or a
repetition is sized before it runs); parts made of constants are evaluated at parse time, and every
expression is tried at load on the values it can meet, so `1 / 0` or `'a' * 10**9` stops the file.

Conditions are kept by construction, never by rejection: a condition filters the candidate
values of the last parameter it names (which must be a choice or an int range) given the values
sampled before it. Optuna needs a fixed set of choices per parameter name, so a parameter filtered
by earlier values is suggested to Optuna under a name that carries those values
(`model_config.heads|model_config.dim=112`); the trial sees the plain name.

`load_space(path)` raises `UserError` with one line naming the file and the key.
"""
import ast
import functools
import itertools
import json
import math
import operator
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from htnet.errors import UserError
from htnet.io import parse_yaml, read_yaml

BUILTINS = {"image_size": 28}
OBJECTIVES = {"inner": "inner_val_uf1", "paper": "paper_full_uf1"}
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "percentile", "successive_halving", "hyperband", "wilcoxon", "patient", "none")
TOP_KEYS = ("description", "num_samples", "max_concurrent_trials", "objective", "resources",
            "max_failures", "sampler", "pruner", "data", "fixed", "space", "conditions")
DATA_KEYS = ("synthetic_subjects", "synthetic_seed")
MAX_ENUMERATION = 100_000
SPACES_DIR = Path(__file__).resolve().parents[1] / "spaces"


# ----------------------------------------------------------------------------- expressions

# An expression costs little whatever the file says: the text, its node count and depth are bounded
# at parse time; every value it computes with (names, constants, each operation's result) is a
# small integer, a short string or a short list; a power or a repetition is sized before it runs.
MAX_EXPR_CHARS = 1000
MAX_EXPR_NODES = 200
MAX_EXPR_DEPTH = 32
MAX_INT_BITS = 128
MAX_TEXT = 256                # characters of a string value
MAX_ITEMS = 1000              # values in a list or mapping, nested ones included
MAX_EVALUATIONS = 500_000     # expression evaluations a load-time check may spend
EXERCISE_COMBINATIONS = 10_000  # value combinations each expression is tried on at load


class _Missing(Exception):
    """A name the expression uses has no value in this configuration."""


class _TooCostly(Exception):
    """An operation whose result would be too big to compute with."""


def _is_number(value):
    return isinstance(value, (int, float))


def _pow(base, exponent):
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and \
            (abs(base).bit_length() - 1) * exponent > MAX_INT_BITS:
        raise _TooCostly(f"integer result over {MAX_INT_BITS} bits")
    return operator.pow(base, exponent)


def _mul(left, right):
    for seq, count in ((left, right), (right, left)):
        if isinstance(seq, (str, list, tuple)) and isinstance(count, int):
            text = isinstance(seq, str)
            if len(seq) * count > (MAX_TEXT if text else MAX_ITEMS):
                raise _TooCostly(f"string result over {MAX_TEXT} characters" if text else
                                 f"{type(seq).__name__} result over {MAX_ITEMS} values")
    return operator.mul(left, right)


def _numeric(op):
    def apply(left, right):  # no string formatting ('%0999999d' % 1), no sequence arithmetic
        if not (_is_number(left) and _is_number(right)):
            raise TypeError(f"unsupported operand types {type(left).__name__} and {type(right).__name__}")
        return op(left, right)
    return apply


_BINOPS = {ast.Add: operator.add, ast.Sub: _numeric(operator.sub), ast.Mult: _mul,
           ast.Div: _numeric(operator.truediv), ast.FloorDiv: _numeric(operator.floordiv),
           ast.Mod: _numeric(operator.mod), ast.Pow: _numeric(_pow)}
_CMPOPS = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
           ast.Gt: operator.gt, ast.GtE: operator.ge, ast.In: lambda a, b: a in b,
           ast.NotIn: lambda a, b: a not in b}
_UNARY = {ast.Not: operator.not_, ast.USub: operator.neg, ast.UAdd: operator.pos}
_FUNCS = {"len": len, "min": min, "max": max, "abs": abs}


def _bounded(value, what="result"):
    """`value`, if it is small enough to compute with; else _TooCostly says why."""
    budget, stack = MAX_ITEMS, [value]
    while stack:
        item = stack.pop()
        if isinstance(item, bool) or item is None or isinstance(item, float):
            continue
        if isinstance(item, int):
            if item.bit_length() > MAX_INT_BITS:
                raise _TooCostly(f"integer {what} over {MAX_INT_BITS} bits")
        elif isinstance(item, str):
            if len(item) > MAX_TEXT:
                raise _TooCostly(f"string {what} over {MAX_TEXT} characters")
        elif isinstance(item, (list, tuple, dict)):
            items = list(item.items()) if isinstance(item, dict) else item
            budget -= len(items)
            if budget < 0:
                raise _TooCostly(f"{type(value).__name__} {what} over {MAX_ITEMS} values")
            stack.extend(items)
        elif isinstance(item, complex):
            raise TypeError("complex result")
    return value


def _dotted(node):
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def _short(text, limit=80):
    return repr(text if len(text) <= limit else text[:limit - 3] + "...")


class Expr:
    """A small, safe expression over parameter names (no Python eval), cheap to evaluate (see the
    limits above). Parts made of constants only are evaluated once, at parse time, so that
    `'a' * 10**9` or `1 / 0` stops the file at load."""

    def __init__(self, text, where):
        self.text, self.where = str(text), where
        if len(self.text) > MAX_EXPR_CHARS:
            raise UserError(f"{where}: expression too long ({len(self.text)} characters, limit {MAX_EXPR_CHARS})")
        try:
            self.tree = ast.parse(self.text, mode="eval").body
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            raise UserError(f"{where}: cannot parse expression {_short(self.text)}") from None
        stack, count = [(self.tree, 1)], 0
        while stack:
            node, depth = stack.pop()
            count += 1
            if count > MAX_EXPR_NODES or depth > MAX_EXPR_DEPTH:
                limit = f"over {MAX_EXPR_NODES} nodes" if count > MAX_EXPR_NODES else f"nested over {MAX_EXPR_DEPTH} deep"
                raise UserError(f"{where}: expression too costly ({limit}): {_short(self.text)}")
            stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))
        self.names = set()
        self._check(self.tree)

    def _check(self, node):
        """Whitelist the node; collect the names; evaluate the parts without names. Returns
        whether `node` is made of constants only."""
        name = _dotted(node)
        if name is not None:
            if name in _FUNCS:
                raise UserError(f"{self.where}: {name} is a function: call it, as in {name}(...)")
            self.names.add(name)
            return False
        if isinstance(node, ast.Constant):
            if not (node.value is None or isinstance(node.value, (bool, int, float, str))):
                raise UserError(f"{self.where}: constant {node.value!r} is not allowed in {_short(self.text)}")
            self._run(node, {}, "constant")
            return True
        if isinstance(node, (ast.List, ast.Tuple)):
            children = node.elts
        elif isinstance(node, ast.BoolOp):
            children = node.values
        elif isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            children = [node.left, node.right]
        elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            children = [node.operand]
        elif isinstance(node, ast.Compare) and all(type(op) in _CMPOPS for op in node.ops):
            children = [node.left, *node.comparators]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                node.func.id in _FUNCS and not node.keywords:
            children = node.args
        else:
            raise UserError(f"{self.where}: {type(node).__name__} is not allowed in {_short(self.text)}")
        constant = all([self._check(child) for child in children])
        if constant:
            self._run(node, {})
        return constant

    def __call__(self, env):
        return self._run(self.tree, env)

    def _run(self, node, env, what="result"):
        try:
            return self._eval(node, env) if what == "result" else _bounded(node.value, what)
        except _Missing:
            raise
        except _TooCostly as e:
            raise UserError(f"{self.where}: expression too costly ({e}) in {_short(self.text)}") from None
        except (ArithmeticError, TypeError, ValueError, RecursionError, MemoryError) as e:
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"{self.where}: {_short(self.text)} failed: {message}") from None

    def _eval(self, node, env):
        name = _dotted(node)
        if name is not None:
            if name not in env:
                raise _Missing(name)
            return _bounded(env[name], f"value of {name}")
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.List):
            return _bounded([self._eval(item, env) for item in node.elts])
        if isinstance(node, ast.Tuple):
            return _bounded(tuple(self._eval(item, env) for item in node.elts))
        if isinstance(node, ast.BoolOp):
            values = (self._eval(item, env) for item in node.values)
            return all(values) if isinstance(node.op, ast.And) else any(values)
        if isinstance(node, ast.BinOp):
            left, right = self._eval(node.left, env), self._eval(node.right, env)
            return _bounded(_BINOPS[type(node.op)](left, right))
        if isinstance(node, ast.UnaryOp):
            return _bounded(_UNARY[type(node.op)](self._eval(node.operand, env)))
        if isinstance(node, ast.Compare):
            left = self._eval(node.left, env)
            for op, comparator in zip(node.ops, node.comparators):
                right = self._eval(comparator, env)
                if not _CMPOPS[type(op)](left, right):
                    return False
                left = right
            return True
        if isinstance(node, ast.Call):
            return _bounded(_FUNCS[node.func.id](*[self._eval(item, env) for item in node.args]))
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
    return json.dumps(value, default=str)  # default: a YAML date, set, ...


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
        points, evaluations = [{}], 0
        for param in self.params:
            grown = []
            for point in points:
                env = {**BUILTINS, **{f.name: f.value for f in self.fixed if f.when is None}, **point}
                if param.when is not None and not param.when.holds(env, missing=False):
                    grown.append(point)
                    continue
                if param.conditions:
                    evaluations += len(param.values()) * len(param.conditions)
                    if evaluations > MAX_EVALUATIONS:
                        raise UserError(f"{self.source}: the grid is too costly to enumerate (over "
                                        f"{MAX_EVALUATIONS:,} condition evaluations)")
                for value in (param.allowed(env) if param.conditions else param.values()):
                    grown.append({**point, param.name: value})
                    if len(grown) > MAX_ENUMERATION:
                        raise UserError(f"{self.source}: the grid has more than {MAX_ENUMERATION} points")
            points = grown
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
        cls = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
               "grid": optuna.samplers.GridSampler}[self.sampler["type"]]
        check_arguments(cls, options, f"{self.source}: sampler")
        try:
            if cls is optuna.samplers.GridSampler:
                return cls(self.grid_search_space(), **options)
            return cls(**options)
        except (TypeError, ValueError) as e:
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
                check_arguments(optuna.pruners.PatientPruner, spec, where)
                return optuna.pruners.PatientPruner(inner, **spec)
            check_arguments(classes[kind], spec, where)
            return classes[kind](**spec)
        except (TypeError, ValueError) as e:
            raise UserError(f"{where}: {e}") from None


def check_arguments(cls, options, where):
    """Optuna's arguments from YAML as its annotations want them: `n_startup_trials: 2.0`,
    `seed: true` or `p_threshold: .nan` is one line naming the key, not a sampler that fails later.
    Keys the constructor does not take are left to its TypeError."""
    import inspect

    parameters = inspect.signature(cls).parameters
    for key, value in options.items():
        if key not in parameters:
            continue
        annotation = parameters[key].annotation
        if annotation is inspect.Parameter.empty:
            continue
        kinds = [k.strip() for k in str(getattr(annotation, "__name__", annotation)).split("|")]
        integer = isinstance(value, int) and not isinstance(value, bool)
        ok = (value is None and "None" in kinds) or (isinstance(value, bool) and "bool" in kinds) or \
            (isinstance(value, str) and "str" in kinds) or (integer and ("int" in kinds or "float" in kinds)) or \
            (isinstance(value, float) and math.isfinite(value) and "float" in kinds)
        if not ok:
            words = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "text", "None": "null"}
            raise UserError(f"{where}.{key}: expected {' or '.join(words.get(k, k) for k in kinds)}, got {value!r}")


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


def _number(value, where):
    """A range bound, step or resource: a finite number. YAML 1.1 reads 1e-4 (no dot) as text:
    numeric text counts too."""
    number = value
    if isinstance(value, str):
        for kind in (int, float):
            try:
                number = kind(value)
                break
            except ValueError:
                pass
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        raise UserError(f"{where}: expected a number, got {value!r}")
    if isinstance(number, float) and not math.isfinite(number):
        raise UserError(f"{where}: expected a finite number, got {value!r}")
    if isinstance(number, int) and abs(number) > 2**63:
        raise UserError(f"{where}: a {number.bit_length()}-bit integer is out of range (at most 2**63)")
    return number


@functools.cache
def _value_kinds():
    """LosoConfig's numeric keys, from its annotations: key -> ("integer" | "number", the other
    types the key takes, e.g. None and list for `subjects: int | list | None`)."""
    import dataclasses
    import typing

    from htnet.loso import LosoConfig

    kinds = {}
    for f in dataclasses.fields(LosoConfig):
        args = set(typing.get_args(f.type)) or {f.type}
        kind = "number" if float in args else "integer" if int in args else None
        if kind:
            kinds[f.name] = (kind, tuple(a for a in args if a not in (int, float)))
    return kinds


def _first_non_finite(value):
    """(path, number) of the first nan or inf in a (nested) value, else None."""
    stack = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return path, item
        if isinstance(item, dict):
            stack.extend(reversed([(f"{path}.{k}", v) for k, v in item.items()]))
        elif isinstance(item, (list, tuple)):
            stack.extend(reversed([(f"{path}[{i}]", v) for i, v in enumerate(item)]))
    return None


def check_value(name, value, where):
    """A LOSO config value from a space file, `--set` or a rerun's config: an integer key takes an
    integer (not 2.0, not true), a number key a number, and no value holds nan or inf."""
    kind, others = _value_kinds().get(name, (None, ()))
    if kind is not None and not isinstance(value, others):
        integer = isinstance(value, int) and not isinstance(value, bool)
        if not (integer or (kind == "number" and isinstance(value, float))):
            hint = ""
            if kind == "number" and isinstance(value, str) and _number_text(value):
                hint = " (YAML reads 1e-4 without a dot as text: write 1.0e-4)"
            raise UserError(f"{where}: expected {'an integer' if kind == 'integer' else 'a number'}, "
                            f"got {value!r}{hint}")
    bad = _first_non_finite(value)
    if bad is not None:
        raise UserError(f"{where}{bad[0]}: expected a finite number, got {bad[1]!r}")


def _number_text(text):
    try:
        float(text)
        return True
    except ValueError:
        return False


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
        for i, value in enumerate(choices):
            check_value(name, value, f"{where}.choice[{i}]")
        return Param(name, "choice", choices=list(choices))
    for bound in ("low", "high"):
        if bound not in spec:
            raise UserError(f"{where}: needs 'choice', or 'low' and 'high' (missing {bound!r})")
    low = _number(spec["low"], f"{where}.low")
    high = _number(spec["high"], f"{where}.high")
    integer_key = _value_kinds().get(name, ("",))[0] == "integer"
    kind = spec.get("type")
    if kind is None:
        kind = "int" if integer_key or (isinstance(low, int) and isinstance(high, int)) else "float"
    if kind not in ("int", "float"):
        raise UserError(f"{where}.type: expected int or float, got {kind!r}")
    if kind == "float" and integer_key:
        raise UserError(f"{where}.type: {name} takes integers, not a float range")
    if kind == "int":
        for bound, number in (("low", low), ("high", high)):
            if not isinstance(number, int):
                raise UserError(f"{where}.{bound}: expected an integer, got {spec[bound]!r}")
    if low > high:
        raise UserError(f"{where}: low {low} > high {high}")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise UserError(f"{where}.log: expected true or false, got {log!r}")
    if log and low <= 0:
        raise UserError(f"{where}: log scale needs low > 0, got {low}")
    step = spec.get("step")
    if step is not None:
        step = _number(step, f"{where}.step")
        if step <= 0:
            raise UserError(f"{where}.step: must be > 0, got {step}")
        if log:
            raise UserError(f"{where}: 'step' does not go with 'log'")
        if kind == "int" and not isinstance(step, int):
            raise UserError(f"{where}.step: expected an integer, got {spec['step']!r}")
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
        raise UserError(f"{source}: expected a mapping at the top level, got {type(raw).__name__} {_short(str(raw), 40)}")
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
            value = _number(value, f"{source}: resources.{key}")
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
            check_value(str(name), spec["value"], f"{where}.value")
            spec = spec["value"]
        elif isinstance(spec, dict):
            raise UserError(f"{where}: a fixed value that is a mapping needs the form {{value: ..., when: ...}}")
        else:
            check_value(str(name), spec, where)
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
            check_value(name, spec["value"], f"{where}.value")
            fixed.append(Fixed(name, spec["value"], Expr(spec["when"], f"{where}.when") if "when" in spec else None))
        elif isinstance(spec, dict):
            param = _parse_param(name, spec, where)
            param.where = where
            if "when" in spec:
                param.when = Expr(spec["when"], f"{where}.when")
            params.append(param)
        else:
            check_value(name, spec, where)
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
    _exercise_expressions(space)
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
        domains = [d.values() for d in deps]
        cost = min(math.prod(map(len, domains)), MAX_ENUMERATION) * len(param.values()) * len(param.conditions)
        if cost > MAX_EVALUATIONS:
            raise UserError(f"{space.source}: space.{param.name}: checking its conditions takes {cost:,} "
                            f"evaluations (limit {MAX_EVALUATIONS:,}): narrow the ranges or list choices")
        for combo in itertools.islice(itertools.product(*domains), MAX_ENUMERATION):
            env = {**static_env, **{d.name: v for d, v in zip(deps, combo)}}
            if not param.allowed(env):
                context = ", ".join(f"{d.name}={v!r}" for d, v in zip(deps, combo)) or "the fixed values"
                raise UserError(f"{space.source}: space.{param.name}: no value satisfies the conditions "
                                f"when {context}")


def _exercise_expressions(space):
    """Evaluate every `when` and condition on the values it can meet (every choice, a float
    range's ends, a long int range's ends), so that one that fails (`1 / heads` with heads 0, a
    string compared with a number, too costly) stops the search at the start, not in a trial."""
    domains = {name: [value] for name, value in BUILTINS.items()}
    for item in space.fixed:
        domains.setdefault(item.name, []).append(item.value)
    for param in space.params:
        if param.kind == "choice":
            domains[param.name] = param.choices
        elif param.kind == "float":
            domains[param.name] = [param.low, param.high]
        else:
            step = param.step or 1
            count = (param.high - param.low) // step + 1
            domains[param.name] = param.values() if count <= 100 else [param.low, param.low + (count - 1) * step]
    expressions = [p.when for p in space.params if p.when is not None] + \
        [f.when for f in space.fixed if f.when is not None] + space.conditions
    for expr in expressions:
        names = sorted(expr.names & set(domains))
        combos = itertools.product(*[domains[n] for n in names])
        for combo in itertools.islice(combos, EXERCISE_COMBINATIONS):
            try:
                expr(dict(zip(names, combo)))
            except _Missing:
                pass


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
    except (TypeError, ValueError, ArithmeticError, RuntimeError) as e:
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
    return parse_space(read_yaml(path), str(path))  # not UTF-8, not YAML, an alias bomb: one line


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
        parsed = parse_yaml(value, f"--set {key}")
        check_value(key, parsed, f"--set {key}")
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
