"""The search space file: parse and check it into a SearchSpace (one-line UserError naming the file and key).
The format is described in docs/design.md and search/spaces/*.yaml."""
import contextlib
import copy
import math
from dataclasses import dataclass, field
from pathlib import Path

from htnet.errors import UserError, first_line
from htnet.io import parse_yaml, read_yaml
from search.space.expressions import Expr, short
from search.space.sampling import BUILTINS, PRUNERS, ParamSampling, SpaceSampling, nest, optuna_value

OBJECTIVES = {"inner": "inner_val_uf1", "paper": "paper_full_uf1"}
SAMPLERS = ("tpe", "random", "grid")
TOP_KEYS = ("description", "num_samples", "max_concurrent_trials", "objective", "resources",
            "max_failures", "sampler", "pruner", "data", "fixed", "space", "conditions")
# section -> key -> (default, kind, op, bound)
SECTIONS = {"resources": {"cpu": (1.0, float, ">", 0), "gpu": (0.0, float, ">=", 0)},
            "data": {"synthetic_subjects": (4, int, ">=", 1), "synthetic_seed": (0, int, ">=", 0)}}
PARAM_KEYS = ("choice", "high", "log", "low", "step", "type", "when")
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


def _loso_config(values, where):
    """LosoConfig.from_dict(values), its model built on the meta device (no memory, no time); errors name `where`."""
    import torch

    from htnet.loso import LosoConfig

    try:
        with torch.device("meta"):
            return LosoConfig.from_dict(values)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    except (TypeError, ValueError, ArithmeticError, RuntimeError) as e:
        raise UserError(f"{where}: {first_line(e)}") from None


def check_value(name, value, where):
    """`value` as LosoConfig takes it for the key `name` (YAML 1.1's text 1e-4 becomes a float), else a UserError
    starting with `where`; other keys are neutral (STSTNet, no inner), model arguments only refused non-finite."""
    if name.startswith("model_config."):
        if any(isinstance(v, float) and not math.isfinite(v) for v in (value if isinstance(value, list) else [value])):
            raise UserError(f"{where}: expected a finite number, got {value!r}")
        return value
    return _loso_config({"model": "ststnet", "protocols": ["paper"], name: value}, where).to_dict()[name]


def _number(value, where):
    """A range bound, step or resource: a finite number (numeric text counts: YAML 1.1 reads 1e-4 as text)."""
    number = value
    for kind in (int, float) if isinstance(value, str) else ():
        with contextlib.suppress(ValueError):
            number = kind(value)
            break
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        raise UserError(f"{where}: expected a number, got {value!r}")
    if isinstance(number, float) and not math.isfinite(number):
        raise UserError(f"{where}: expected a finite number, got {value!r}")
    if isinstance(number, int) and abs(number) > 2**63:
        raise UserError(f"{where}: a {number.bit_length()}-bit integer is out of range (at most 2**63)")
    return number


def _known(mapping, known, where):
    unknown = [key for key in mapping if key not in known]
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(known)})")


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
    _known(spec, PARAM_KEYS, where)
    when = Expr(spec["when"], f"{where}.when") if "when" in spec else None
    if "choice" in spec:
        extra = sorted(set(spec) - {"choice", "when"})
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
    numbers = {key: _number(spec[key], f"{where}.{key}") for key in ("low", "high", "step")
               if key != "step" or spec.get(key) is not None}
    low, high, step, log = numbers["low"], numbers["high"], numbers.get("step"), spec.get("log", False)
    kind = spec.get("type", "int" if isinstance(low, int) and isinstance(high, int) else "float")
    checks = [(kind not in ("int", "float"), f"{where}.type: expected int or float, got {kind!r}"),
              *((kind == "int" and not isinstance(n, int), f"{where}.{key}: expected an integer, got {spec[key]!r}")
                for key, n in numbers.items()),
              (low > high, f"{where}: low {low} > high {high}"),
              (not isinstance(log, bool), f"{where}.log: expected true or false, got {log!r}"),
              (log is True and low <= 0, f"{where}: log scale needs low > 0, got {low}"),
              (step is not None and step <= 0, f"{where}.step: must be > 0, got {step}"),
              (step is not None and log, f"{where}: 'step' does not go with 'log'")]
    for failed, message in checks:
        if failed:
            raise UserError(message)
    for bound, number in (("low", low), ("high", high)):
        check_value(name, number, f"{where}.{bound}")  # LosoConfig's ranges are intervals: both ends suffice
    if kind == "float":
        try:
            check_value(name, float(low), where)
        except UserError:
            raise UserError(f"{where}.type: {name} takes integers, not a float range") from None
    cast = int if kind == "int" else float
    return Param(name, kind, low=cast(low), high=cast(high), log=log, step=step, when=when, where=where)


def _limited(value, kind, op, bound, where):
    """A setting that is an integer (kind int) or a finite number (float) {op} bound."""
    number = float(_number(value, where)) if kind is float else value
    if (kind is int and (isinstance(value, bool) or not isinstance(value, int))) or \
            not (number > bound if op == ">" else number >= bound):
        raise UserError(f"{where}: expected {'an integer' if kind is int else 'a number'} {op} {bound}, got {value!r}")
    return number


def _settings(raw, source):
    """The search settings of a space file (everything but fixed, space and conditions)."""
    settings = {key: _limited(raw[key], int, ">=", minimum, f"{source}: {key}")
                for key, minimum in (("num_samples", 1), ("max_concurrent_trials", 1), ("max_failures", 0))
                if key in raw}
    if "description" in raw:
        settings["description"] = str(raw["description"])
    if "objective" in raw:
        if raw["objective"] not in OBJECTIVES:
            raise UserError(f"{source}: objective: expected one of {', '.join(OBJECTIVES)}, got {raw['objective']!r}")
        settings["objective"] = raw["objective"]
    for key, example in (("resources", "{cpu: 1, gpu: 0.25}"), ("data", "{synthetic_subjects: 2}")):
        if key not in raw:
            continue
        if not isinstance(raw[key], dict):
            raise UserError(f"{source}: {key}: expected a mapping like {example}")
        limits = SECTIONS[key]
        _known(raw[key], limits, f"{source}: {key}")
        settings[key] = {name: _limited(raw[key][name], *limits[name][1:], f"{source}: {key}.{name}")
                         if name in raw[key] else limits[name][0] for name in limits}
    for key, choices in (("sampler", SAMPLERS), ("pruner", tuple(PRUNERS))):
        if key not in raw:
            continue
        spec = {"type": raw[key]} if isinstance(raw[key], str) else raw[key]
        if not isinstance(spec, dict):
            raise UserError(f"{source}: {key}: expected a mapping like {{type: {choices[0]}}}")
        spec = {"type": choices[0], **({"seed": 0} if key == "sampler" else {}), **spec}  # seed: null unseeds
        if spec["type"] not in choices:
            raise UserError(f"{source}: {key}.type: unknown {key} {spec['type']!r} (known: {', '.join(choices)})")
        settings[key] = spec
    return settings


def parse_space(raw, source="<space>"):
    """A mapping (the YAML file's content) -> SearchSpace; UserError names the first bad key."""
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise UserError(f"{source}: expected a mapping at the top level, got {type(raw).__name__} "
                        f"{short(str(raw), 40)}")
    _known(raw, TOP_KEYS, source)
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
                _known(spec, ("value", "when"), where)
                when = Expr(spec["when"], f"{where}.when") if "when" in spec else None
                spec, where = spec["value"], f"{where}.value"
            fixed.append(Fixed(name, check_value(name, spec, where), when))

    # `when` may only use names defined before (fixed values, earlier parameters, builtins)
    defined = set(BUILTINS) | {f.name for f in fixed}
    for item in [*params, *fixed]:
        unknown = sorted(item.when.names - defined) if item.when is not None else []
        if unknown and isinstance(item, Param):
            raise UserError(f"{source}: space.{item.name}.when: {unknown[0]!r} is not a fixed value "
                            f"or a parameter defined before {item.name}")
        if unknown:
            raise UserError(f"{source}: {item.name}.when: unknown name {unknown[0]!r}")
        defined.add(item.name)

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
    """Evaluate every `when` and condition on the values it can meet (choices, a range's ends): one that fails
    (`1 / heads` with heads 0) stops the search at the start."""
    domains = {name: [value] for name, value in BUILTINS.items()}
    for item in space.fixed:
        domains.setdefault(item.name, []).append(item.value)
    for param in space.params:
        if param.kind == "int":
            values = range(param.low, param.high + 1, param.step or 1)
            domains[param.name] = list(values) if len(values) <= 100 else [values[0], values[-1]]
        else:
            domains[param.name] = param.choices if param.kind == "choice" else [param.low, param.high]
    for expr in [p.when for p in space.params] + [f.when for f in space.fixed] + space.conditions:
        if expr is not None:
            expr.exercise(domains)


def check_fixed_values(space, where, model=True):
    """What every trial gets, checked before any trial (again after --set): the fixed values without `when` and,
    where nothing about the model is sampled or conditional, the model itself (built on the meta device)."""
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
    _loso_config({**values, **model_values}, where)


def _check_objective(space):
    protocols = space.fixed_env().get("protocols")
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


def parse_set(text):
    """`--set KEY=VALUE` -> (KEY, the YAML value; model_config.KEY for the model)."""
    key, sep, value = str(text).partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError(f"--set {text!r}: expected KEY=VALUE")
    return key, parse_yaml(value, f"--set {key}")


def set_fixed(space, assignments):
    """Apply `--set KEY=VALUE` (YAML values) to the fixed values of a copy of `space`."""
    if not assignments:
        return space
    space = copy.deepcopy(space)
    for key, value in map(parse_set, assignments):
        _check_key(key, f"--set {key}")
        if key in space.names:
            raise UserError(f"--set {key}: {key} is sampled by the space; edit the space file instead")
        value = check_value(key, value, f"--set {key}")
        space.fixed = [f for f in space.fixed if f.name != key] + [Fixed(key, value)]
    _check_objective(space)
    check_fixed_values(space, "--set", model=False)  # the model: check_fixed_values, once all is set
    return space

