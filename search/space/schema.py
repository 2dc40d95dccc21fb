"""The search space file: parse and check it into a SearchSpace (one-line UserError naming the file and key).

    num_samples: 6                 # trials (grid: at most the number of grid points)
    max_concurrent_trials: 2
    objective: inner               # inner (leak-free validation UF1) | paper (test-fold UF1)
    resources: {cpu: 1, gpu: 0}    # per trial; fractional GPUs pack trials: gpu: 0.25 -> 4 per GPU
    max_failures: 2                # retries of a trial whose worker died
    sampler: {type: tpe, seed: 0}  # tpe | random | grid, plus the Optuna sampler's arguments
    pruner: {type: median, n_startup_trials: 2, n_warmup_steps: 1}   # any of sampling.PRUNERS
    data: {synthetic_subjects: 2}  # the built-in synthetic set when no --data is given
    fixed:                         # LosoConfig keys held fixed (model_config.<key> for the model)
      epochs: 3
      model_config.num_hierarchies: {value: 1, when: "model == 'htnet'"}
    space:                         # sampled, in this order
      model: {choice: [htnet, ststnet]}
      lr: {low: 1.0e-4, high: 1.0e-2, log: true}      # float range, log scale
      model_config.heads: {low: 1, high: 4, when: "model == 'htnet'"}   # int range
    conditions:                    # must hold for every sampled configuration
      - model_config.dim % model_config.heads == 0

A parameter is a choice list (any YAML values), an int range (integer `low`/`high`, optional `step`, `log`)
or a float range (`type: int|float` forces the kind); a plain value in `space` is fixed. Every value is
checked by LosoConfig's rules for its key. `when` makes a parameter or fixed value apply to some
configurations only. Expressions (`when`, `conditions`: expressions.py) use parameter names, `image_size`,
numbers, strings, arithmetic, comparisons, and/or/not, `in`, len/min/max/abs. Conditions are kept by
construction: one filters the candidates of the last parameter it names (a choice or an int range).
"""
import copy
import math
from dataclasses import dataclass, field
from pathlib import Path

from htnet.errors import UserError
from htnet.io import parse_yaml, read_yaml
from search.space.expressions import Expr, exercise, short
from search.space.sampling import BUILTINS, PRUNERS, ParamSampling, SpaceSampling, nest, optuna_value

OBJECTIVES = {"inner": "inner_val_uf1", "paper": "paper_full_uf1"}
SAMPLERS = ("tpe", "random", "grid")
TOP_KEYS = ("description", "num_samples", "max_concurrent_trials", "objective", "resources",
            "max_failures", "sampler", "pruner", "data", "fixed", "space", "conditions")
DATA_KEYS = ("synthetic_subjects", "synthetic_seed")
PARAM_KEYS = {"choice", "low", "high", "log", "step", "type", "when"}
SPACES_DIR = Path(__file__).resolve().parents[1] / "spaces"


@dataclass
class Param(ParamSampling):
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


@dataclass
class Fixed:
    name: str
    value: object
    when: Expr | None = None


@dataclass
class SearchSpace(SpaceSampling):
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


def check_value(name, value, where):
    """`value` as LosoConfig takes it for the key `name` (lr's text 1e-4, as YAML 1.1 reads it, becomes a float),
    else a UserError starting with `where`. A rule that depends on another key sees a neutral one (protocols
    without inner, STSTNet); a model argument, whose model may be unknown here, is only refused non-finite."""
    import torch

    from htnet.loso import LosoConfig

    if name.startswith("model_config."):
        if any(isinstance(v, float) and not math.isfinite(v) for v in (value if isinstance(value, list) else [value])):
            raise UserError(f"{where}: expected a finite number, got {value!r}")
        return value
    try:
        with torch.device("meta"):  # a model is built without memory or time
            return LosoConfig.from_dict({"model": "ststnet", "protocols": ["paper"], name: value}).to_dict()[name]
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


def _number(value, where):
    """A range bound, step or resource: a finite number (numeric text counts: YAML 1.1 reads 1e-4 as text)."""
    number = value
    for kind in (int, float) if isinstance(value, str) else ():
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


def _check_key(name, where):
    import dataclasses

    from htnet.loso import LosoConfig

    config_keys = {f.name for f in dataclasses.fields(LosoConfig)}
    if name == "model_config":
        raise UserError(f"{where}: give model arguments one by one as model_config.<name>")
    if name.startswith("model_config.") and not name.split(".", 1)[1]:
        raise UserError(f"{where}: empty model_config key")
    if name not in config_keys and not name.startswith("model_config."):
        raise UserError(f"{where}: unknown key {name!r} (LOSO config keys: {', '.join(sorted(config_keys))}, "
                        f"model_config.<name>)")


def _parse_param(name, spec, where):
    unknown = sorted(set(spec) - PARAM_KEYS)
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(PARAM_KEYS))})")
    when = Expr(spec["when"], f"{where}.when") if "when" in spec else None
    if "choice" in spec:
        extra = sorted(set(spec) & (PARAM_KEYS - {"choice", "when"}))
        if extra:
            raise UserError(f"{where}: {extra[0]!r} does not go with 'choice'")
        choices = spec["choice"]
        if not isinstance(choices, list):
            raise UserError(f"{where}.choice: expected a list, got {choices!r}")
        if not choices:
            raise UserError(f"{where}.choice: empty choice list")
        if len({repr(optuna_value(v)) for v in choices}) != len(choices):
            raise UserError(f"{where}.choice: repeated value in {choices!r}")
        return Param(name, "choice", choices=[check_value(name, v, where) for v in choices], when=when, where=where)
    missing = [bound for bound in ("low", "high") if bound not in spec]
    if missing:
        raise UserError(f"{where}: needs 'choice', or 'low' and 'high' (missing {missing[0]!r})")
    low, high = _number(spec["low"], f"{where}.low"), _number(spec["high"], f"{where}.high")
    kind = spec.get("type", "int" if isinstance(low, int) and isinstance(high, int) else "float")
    if kind not in ("int", "float"):
        raise UserError(f"{where}.type: expected int or float, got {kind!r}")
    for bound, number in (("low", low), ("high", high)):
        if kind == "int" and not isinstance(number, int):
            raise UserError(f"{where}.{bound}: expected an integer, got {spec[bound]!r}")
    if low > high:
        raise UserError(f"{where}: low {low} > high {high}")
    log, step = spec.get("log", False), spec.get("step")
    if not isinstance(log, bool):
        raise UserError(f"{where}.log: expected true or false, got {log!r}")
    if log and low <= 0:
        raise UserError(f"{where}: log scale needs low > 0, got {low}")
    if step is not None:
        step = _number(step, f"{where}.step")
        if step <= 0:
            raise UserError(f"{where}.step: must be > 0, got {step}")
        if log:
            raise UserError(f"{where}: 'step' does not go with 'log'")
        if kind == "int" and not isinstance(step, int):
            raise UserError(f"{where}.step: expected an integer, got {spec['step']!r}")
    for bound, number in (("low", low), ("high", high)):
        check_value(name, number, f"{where}.{bound}")  # LosoConfig's ranges are intervals: both ends suffice
    if kind == "float":
        try:
            check_value(name, float(low), where)
        except UserError:
            raise UserError(f"{where}.type: {name} takes integers, not a float range") from None
    cast = int if kind == "int" else float
    return Param(name, kind, low=cast(low), high=cast(high), log=log, step=step, when=when, where=where)


def _settings(raw, source):
    """The search settings of a space file (everything but fixed, space and conditions)."""
    settings = {}
    for key, minimum in (("num_samples", 1), ("max_concurrent_trials", 1), ("max_failures", 0)):
        value = raw.get(key, minimum)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise UserError(f"{source}: {key}: expected an integer >= {minimum}, got {value!r}")
        if key in raw:
            settings[key] = value
    if "description" in raw:
        settings["description"] = str(raw["description"])
    if "objective" in raw:
        if raw["objective"] not in OBJECTIVES:
            raise UserError(f"{source}: objective: expected one of {', '.join(OBJECTIVES)}, got {raw['objective']!r}")
        settings["objective"] = raw["objective"]
    if "resources" in raw:
        if not isinstance(raw["resources"], dict):
            raise UserError(f"{source}: resources: expected a mapping like {{cpu: 1, gpu: 0.25}}")
        settings["resources"] = out = {"cpu": 1.0, "gpu": 0.0}
        for key, value in raw["resources"].items():
            if key not in out:
                raise UserError(f"{source}: resources: unknown key {key!r} (known: cpu, gpu)")
            value = _number(value, f"{source}: resources.{key}")
            if value < 0 or (key == "cpu" and value <= 0):
                raise UserError(f"{source}: resources.{key}: must be {'> 0' if key == 'cpu' else '>= 0'}, got {value}")
            out[key] = float(value)
    for key, choices in (("sampler", SAMPLERS), ("pruner", PRUNERS)):
        if key not in raw:
            continue
        spec = {"type": raw[key]} if isinstance(raw[key], str) else raw[key]
        if not isinstance(spec, dict):
            raise UserError(f"{source}: {key}: expected a mapping like {{type: {choices[0]}}}")
        spec = {"type": choices[0], **({"seed": 0} if key == "sampler" else {}), **spec}  # seed: null unseeds
        if spec["type"] not in choices:
            raise UserError(f"{source}: {key}.type: unknown {key} {spec['type']!r} (known: {', '.join(choices)})")
        settings[key] = spec
    if "data" in raw:
        if not isinstance(raw["data"], dict):
            raise UserError(f"{source}: data: expected a mapping like {{synthetic_subjects: 2}}")
        settings["data"] = out = {"synthetic_subjects": 4, "synthetic_seed": 0}
        for key, value in raw["data"].items():
            if key not in DATA_KEYS:
                raise UserError(f"{source}: data: unknown key {key!r} (known: {', '.join(DATA_KEYS)})")
            minimum = 1 if key == "synthetic_subjects" else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise UserError(f"{source}: data.{key}: expected a non-negative integer, got {value!r}")
            out[key] = value
    return settings


def parse_space(raw, source="<space>"):
    """A mapping (the YAML file's content) -> SearchSpace; UserError names the first bad key."""
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise UserError(f"{source}: expected a mapping at the top level, got {type(raw).__name__} "
                        f"{short(str(raw), 40)}")
    for key in raw:
        if key not in TOP_KEYS:
            raise UserError(f"{source}: unknown key {key!r} (known: {', '.join(TOP_KEYS)})")
    settings = _settings(raw, source)
    fixed, params, seen = [], [], {}
    for section in ("fixed", "space"):
        content = raw.get(section) or {}
        if not isinstance(content, dict):
            raise UserError(f"{source}: {section}: expected a mapping of parameter names")
        for name, spec in content.items():
            name = str(name)
            where = f"{source}: {section}.{name}"
            _check_key(name, where)
            if name in seen:
                raise UserError(f"{where}: also given in {seen[name]}")
            seen[name] = section
            if section == "space" and isinstance(spec, dict) and ({"choice", "low", "high"} & set(spec) or
                                                                   "value" not in spec):
                params.append(_parse_param(name, spec, where))
                continue
            when = None
            if isinstance(spec, dict):  # {value: ..., when: ...}
                if "value" not in spec:
                    raise UserError(f"{where}: a fixed value that is a mapping needs the form "
                                    "{value: ..., when: ...}")
                unknown = sorted(set(spec) - {"value", "when"})
                if unknown:
                    raise UserError(f"{where}: unknown key {unknown[0]!r} (known: value, when)")
                when = Expr(spec["when"], f"{where}.when") if "when" in spec else None
                spec, where = spec["value"], f"{where}.value"
            fixed.append(Fixed(name, check_value(name, spec, where), when))

    # `when` may only use names defined before (fixed values, earlier parameters, builtins)
    defined = set(BUILTINS) | {f.name for f in fixed}
    for param in params:
        unknown = sorted(param.when.names - defined) if param.when is not None else []
        if unknown:
            raise UserError(f"{source}: space.{param.name}.when: {unknown[0]!r} is not a fixed value "
                            f"or a parameter defined before {param.name}")
        defined.add(param.name)
    for item in fixed:
        unknown = sorted(item.when.names - defined) if item.when is not None else []
        if unknown:
            raise UserError(f"{source}: {item.name}.when: unknown name {unknown[0]!r}")

    conditions_raw = raw.get("conditions") or []
    if not isinstance(conditions_raw, list):
        raise UserError(f"{source}: conditions: expected a list of expressions")
    space = SearchSpace(source=source, params=params, fixed=fixed, conditions=[], raw=raw, **settings)
    order = {p.name: i for i, p in enumerate(params)}
    for i, text in enumerate(conditions_raw):
        where = f"{source}: conditions[{i}]"
        if not isinstance(text, str):
            raise UserError(f"{where}: expected an expression string, got {text!r}")
        expr = Expr(text, where)
        unknown = sorted(expr.names - defined)
        if unknown:
            raise UserError(f"{where}: unknown name {unknown[0]!r} in {text!r}")
        space.conditions.append(expr)
        sampled = sorted((n for n in expr.names if n in order), key=order.get)
        if not sampled:
            if not expr.holds(space.fixed_env()):
                raise UserError(f"{where}: {text!r} is false for the fixed values")
            continue
        target = params[order[sampled[-1]]]
        if target.kind == "float":
            raise UserError(f"{where}: {target.name} is a float range; the last parameter a condition "
                            f"names must be a choice list or an int range")
        target.conditions.append(expr)
        target.depends = sorted(set(target.depends) | set(sampled[:-1]), key=order.get)

    space.check_conditions()
    _exercise_expressions(space)
    _check_objective(space)
    check_fixed_values(space, f"{source}: fixed")
    if space.sampler["type"] == "grid" and not space.grid_points():
        raise UserError(f"{source}: the grid is empty")
    space.make_pruner()   # bad pruner or sampler arguments fail here, not in the middle of a search
    space.make_sampler()
    return space


def _exercise_expressions(space):
    """Evaluate every `when` and condition on the values it can meet (every choice, a range's ends), so one
    that fails (`1 / heads` with heads 0, a string compared with a number) stops the search at the start."""
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
    exercise([p.when for p in space.params if p.when is not None] +
             [f.when for f in space.fixed if f.when is not None] + space.conditions, domains)


def check_fixed_values(space, where, model=True):
    """What every trial gets, checked once before any trial: the fixed LOSO values without `when` (so that
    `epochs: 0` stops the search at the start) and, where nothing about the model is sampled or conditional,
    the model itself (built on the meta device: no memory, no time). Again after `--set`."""
    import torch

    from htnet.loso import LosoConfig

    def model_key(name):
        return name == "model" or name.startswith("model_config")

    values = {f.name: f.value for f in space.fixed if f.when is None and not model_key(f.name)}
    if "protocols" in space.names:  # inner_val_subjects only matters where a sample has 'inner'
        values.pop("inner_val_subjects", None)
    model_values = {"model": "ststnet", "model_config": {}}
    if model and not any(model_key(n) for n in space.names) and \
            not any(model_key(f.name) and f.when is not None for f in space.fixed):
        model_values = {"model": "htnet", "model_config": {},
                        **nest({f.name: f.value for f in space.fixed if model_key(f.name)})}
    try:
        with torch.device("meta"):
            LosoConfig.from_dict({**values, **model_values})
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    except (TypeError, ValueError, ArithmeticError, RuntimeError) as e:
        raise UserError(f"{where}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _check_objective(space):
    protocols = {f.name: f.value for f in space.fixed if f.when is None}.get("protocols")
    if protocols is None or "protocols" in space.names:
        return
    protocols = [protocols] if isinstance(protocols, str) else list(protocols)
    if space.objective not in protocols:
        raise UserError(f"{space.source}: fixed.protocols: the {space.objective!r} objective needs the "
                        f"{space.objective!r} protocol, got {protocols}")


def load_space(path):
    """Read and check a search space YAML file (a bare name finds search/spaces/<name>.yaml)."""
    path = Path(path)
    if not path.is_file():
        named = SPACES_DIR / f"{path.name}.yaml" if path.suffix == "" else None
        if named is None or not named.is_file():
            raise UserError(f"search space file not found: {path}")
        path = named
    return parse_space(read_yaml(path), str(path))  # not UTF-8, not YAML, an alias bomb: one line


def with_overrides(space, **overrides):
    """A copy of `space` with search settings replaced (CLI flags); None leaves one as it is."""
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
    if not assignments:
        return space
    space = copy.deepcopy(space)
    for text in assignments:
        key, sep, value = str(text).partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"--set {text!r}: expected KEY=VALUE")
        _check_key(key, f"--set {key}")
        if key in space.names:
            raise UserError(f"--set {key}: {key} is sampled by the space; edit the space file instead")
        value = check_value(key, parse_yaml(value, f"--set {key}"), f"--set {key}")
        space.fixed = [f for f in space.fixed if f.name != key] + [Fixed(key, value)]
    _check_objective(space)
    check_fixed_values(space, "--set", model=False)  # the model: check_fixed_values, once all is set
    return space

