"""Search spaces are define-by-run Python files (search/spaces/demo.py): module-level settings and `def space(trial)`
returning LOSO config keys. A SearchSpace is checked where it enters (the file, CLI flags, --set); `check` samples it
and builds every config drawn, so what would fail a trial stops the search first, in one line."""
import dataclasses
import math
import traceback
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import optuna

from htnet.errors import UserError, first_line
from htnet.io import decode_text, parse_yaml, read_bytes
from htnet.loso import LosoConfig
from search.pruners import SuccessiveHalvingPruner

SPACES_DIR = Path(__file__).resolve().parent / "spaces"
OBJECTIVES = {"inner": "inner_val_uf1", "paper": "paper_full_uf1", "final": "final_full_uf1"}
SAMPLERS = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
            "grid": optuna.samplers.GridSampler}
PRUNERS = {"median": optuna.pruners.MedianPruner, "percentile": optuna.pruners.PercentilePruner,
           "successive_halving": SuccessiveHalvingPruner, "hyperband": optuna.pruners.HyperbandPruner,
           "wilcoxon": optuna.pruners.WilcoxonPruner, "patient": optuna.pruners.PatientPruner,
           "none": optuna.pruners.NopPruner}
# section -> key -> (default, op, bound); the default's type is the value's
LIMITS = {"resources": {"cpu": (1.0, ">", 0), "gpu": (0.0, ">=", 0)},
          "data": {"synthetic_subjects": (4, ">=", 1), "synthetic_seed": (0, ">=", 0)}}
CHECK_DRAWS = 32
LOSO_KEYS = [f.name for f in dataclasses.fields(LosoConfig)]


@dataclass
class SearchSpace:
    source: str                    # the file, as messages name it
    text: str                      # its source, stored with the search ("" for one built in code)
    function: object               # space(trial) -> {LOSO config key: value}
    num_samples: int = 10          # at most the grid's points with the grid sampler
    max_concurrent_trials: int = 2
    objective: str = "inner"       # a key of OBJECTIVES
    resources: dict = field(default_factory=dict)   # per trial: {cpu, gpu}
    max_failures: int = 2
    sampler: dict = field(default_factory=dict)     # {type, Optuna's arguments}
    pruner: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)        # the synthetic set without --data
    description: str = ""
    fixed: dict = field(default_factory=dict)       # LOSO config keys every trial gets
    grid: dict | None = None       # {Optuna parameter name: values}, for the grid sampler
    sets: dict = field(default_factory=dict)        # --set KEY=VALUE: fixed values, sampled ones refused

    def __post_init__(self):
        where = self.source
        if not callable(self.function):
            raise UserError(f"{where}: no function space(trial) returning a dict of LOSO config keys")
        for key, minimum in (("num_samples", 1), ("max_concurrent_trials", 1), ("max_failures", 0)):
            setattr(self, key, _number(getattr(self, key), int, ">=", minimum, f"{where}: {key}"))
        if self.objective not in OBJECTIVES:
            raise UserError(f"{where}: objective: expected one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        for key, limits in LIMITS.items():
            given = _mapping(getattr(self, key), where, key)
            if unknown := sorted(set(given) - set(limits)):
                raise UserError(f"{where}: {key}: unknown key {unknown[0]!r} (known: {', '.join(limits)})")
            setattr(self, key, {name: _number(given.get(name, d), type(d), op, bound, f"{where}: {key}.{name}")
                                for name, (d, op, bound) in limits.items()})
        for key, default in (("sampler", {"type": "tpe", "seed": 0}), ("pruner", {"type": "median"})):
            spec = getattr(self, key)  # a type's name, or {type, its Optuna arguments}; a sampler seed None: unseeded
            setattr(self, key, {**default, **_mapping({"type": spec} if isinstance(spec, str) else spec, where, key)})
        if self.sampler["type"] == "grid":
            if not isinstance(self.grid, dict) or not self.grid or \
                    not all(isinstance(v, (list, tuple)) and v for v in self.grid.values()):
                raise UserError(f"{where}: grid: the grid sampler needs grid = {{parameter name: [values]}}, each "
                                f"list non-empty; got {self.grid!r:.80}")
            self.num_samples = min(self.num_samples, math.prod(map(len, self.grid.values())))
        self.description = str(self.description)
        self.fixed = {key: check_value(key, value, f"{where}: fixed.{key}")
                      for key, value in flatten(_mapping(self.fixed, where, "fixed")).items()}
        self.sets = {key: check_value(key, value, f"--set {key}") for key, value in self.sets.items()}
        self.make_sampler(), self.make_pruner()  # a bad type or argument stops here

    @property
    def metric(self):
        return OBJECTIVES[self.objective]

    def __getstate__(self):  # the function travels as the file's text (Ray pickles the searcher and its tasks' args)
        return {**self.__dict__, "function": None if self.text else self.function}

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self.function is None:
            self.function = _execute(self.text, self.source)["space"]

    def sample(self, trial):
        """space(trial), flattened: a Ray trial's config is what it returns."""
        try:
            values = self.function(trial)
        except Exception as e:  # noqa: BLE001 - whatever the file raises is one line
            raise _failure(e, self.source, "space()") from None
        if not isinstance(values, dict) or not all(isinstance(k, str) for k in values):
            raise UserError(f"{self.source}: space() must return a dict of LOSO config keys, got {values!r:.80}")
        return flatten(values)

    def optuna_space(self):  # the define-by-run function the searcher takes
        return self.sample

    @staticmethod
    def sampled(config):  # a trial's Ray config, as flat keys
        return flatten(dict(config))

    def resolve(self, sampled, overrides=None):
        """Fixed, --set and sampled values + overrides -> a LosoConfig dict."""
        return nest({**self.fixed, **self.sets, **sampled, **(overrides or {})})

    def config(self, sampled, overrides=None):
        """The LosoConfig of sampled values; what rejects it is one UserError naming the file and the values."""
        config, why = _loso_config(self.resolve(sampled, overrides))
        if why:
            raise UserError(f"{self.source}: {', '.join(f'{k}={v!r}' for k, v in sampled.items())}: {why}")
        return config

    def make_sampler(self):
        options = {k: v for k, v in self.sampler.items() if k != "type"}
        grid = {"search_space": self.grid} if self.sampler["type"] == "grid" else {}
        return _build(SAMPLERS, self.sampler["type"], {**options, **grid}, f"{self.source}: sampler")

    def make_pruner(self):
        return make_pruner(self.pruner, f"{self.source}: pruner")


SETTINGS = [f.name for f in dataclasses.fields(SearchSpace)][3:-1]  # what a space file sets: num_samples .. grid

def check(space):
    """Draw `space` CHECK_DRAWS times at random (and once from the grid) and build each config (the model on torch's
    meta device): what would fail a trial is one UserError now. The draws, as (sampled values, LosoConfig)."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))  # a name keeps one distribution
        draws = [space.sample(study.ask()) for _ in range(CHECK_DRAWS)]
        if space.sampler["type"] == "grid":  # the grid names what space() suggests
            draws.append(space.sample(optuna.create_study(sampler=space.make_sampler()).ask()))
    finally:
        optuna.logging.set_verbosity(verbosity)
    pairs = []
    for sampled in draws:
        if clash := [key for key in sampled if key in space.sets]:
            raise UserError(f"--set {clash[0]}: space() in {space.source} samples it; edit the space file instead")
        config, why = _loso_config(space.resolve(sampled))
        if why:
            for key, value in sampled.items():  # a value wrong on its own: named alone
                check_value(key, value, f"{space.source}: space() -> {key}")
            if _loso_config(space.resolve({}))[1] == why:  # the fixed values alone: named so
                raise UserError(f"{space.source}: fixed{' and --set' if space.sets else ''} values: {why}")
            space.config(sampled)
        if space.objective not in config.protocols:
            raise UserError(f"{space.source}: protocols: the {space.objective!r} objective needs the "
                            f"{space.objective!r} protocol, got {list(config.protocols)}")
        pairs.append((sampled, config))
    return pairs


def load_space(path):
    """A space file (a bare name finds search/spaces/<name>.py) -> SearchSpace."""
    path = Path(path)
    if not path.is_file() and path.suffix == "" and (SPACES_DIR / f"{path.name}.py").is_file():
        path = SPACES_DIR / f"{path.name}.py"
    if path.suffix != ".py":
        raise UserError(f"{path}: a search space is a Python file (see search/spaces/demo.py)")
    text = decode_text(read_bytes(path, kind="a space file", max_bytes=1_000_000), str(path))
    namespace = _execute(text, str(path))
    unknown = [name for name, value in namespace.items() if name not in (*SETTINGS, "space") and name.islower()
               and not name.startswith("_") and not callable(value) and not isinstance(value, types.ModuleType)]
    if unknown:
        raise UserError(f"{path}: unknown setting {unknown[0]!r} (settings: {', '.join(SETTINGS)}; constants in "
                        f"UPPER_CASE)")
    return SearchSpace(str(path), text, namespace.get("space"), **{k: namespace[k] for k in SETTINGS if k in namespace})


def with_settings(space, sets=(), cpus=None, gpus=None, seed=None, sampler=None, pruner=None, **settings):
    """A copy of `space` with CLI flags (None keeps the file's) and --set KEY=VALUE values, checked again. Another
    sampler or pruner type drops the file's arguments for it (a sampler keeps its seed)."""
    changes = {key: value for key, value in settings.items() if value is not None}
    if sampler is not None and sampler != space.sampler["type"]:
        changes["sampler"] = {"type": sampler, "seed": space.sampler.get("seed")}
    if seed is not None:
        changes["sampler"] = {**changes.get("sampler", space.sampler), "seed": seed}
    if pruner is not None and pruner != space.pruner["type"]:
        changes["pruner"] = {"type": pruner}
    if resources := {k: v for k, v in (("cpu", cpus), ("gpu", gpus)) if v is not None}:
        changes["resources"] = {**space.resources, **resources}
    return dataclasses.replace(space, **changes, sets={**space.sets, **dict(map(parse_set, sets))})


def trial_config(space, config, overrides=None):
    """The LosoConfig a trial with Ray config `config` runs."""
    return space.config(space.sampled(config), overrides)


def make_pruner(spec, where):
    """The Optuna pruner a `pruner` mapping names (`patient` wraps another: `wrapped`)."""
    options = {k: v for k, v in spec.items() if k not in ("type", "wrapped")}
    if spec.get("type") == "patient":
        options["wrapped_pruner"] = make_pruner(_mapping(spec["wrapped"], where, "wrapped"), f"{where}.wrapped") \
            if spec.get("wrapped") else None
    with warnings.catch_warnings():  # Wilcoxon and Patient are "experimental" in name, stable in use
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return _build(PRUNERS, spec.get("type", "median"), options, where)


def check_value(name, value, where):
    """`value` as LosoConfig takes it for the key `name` (text 1e-4 becomes a float), else one UserError; a model's
    argument (model_config.<name>) is checked with its model."""
    if name.startswith("model_config.") and name != "model_config.":
        if any(isinstance(v, float) and not math.isfinite(v) for v in (value if isinstance(value, list) else [value])):
            raise UserError(f"{where}: expected a finite number, got {value!r}")
        return value
    if name not in LOSO_KEYS or name == "model_config":
        raise UserError(f"{where}: unknown LOSO config key {name!r} (known: {', '.join(LOSO_KEYS)}, "
                        f"model_config.<name>)")
    try:
        return LosoConfig.from_dict({"model": "ststnet", "protocols": ["paper"], name: value}).to_dict()[name]
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


def parse_set(text):  # --set KEY=VALUE -> (KEY, the YAML value)
    key, sep, value = str(text).partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {text!r}: expected KEY=VALUE")
    return key.strip(), parse_yaml(value, f"--set {key.strip()}")


def nest(flat):  # {'model_config.dim': 16, 'lr': 1e-3} -> {'model_config': {'dim': 16}, 'lr': 1e-3}
    out = {}
    for key, value in flat.items():
        if key.startswith("model_config."):
            out.setdefault("model_config", {})[key.split(".", 1)[1]] = value
        else:
            out[key] = {**out.get(key, {}), **(value or {})} if key == "model_config" else value
    return out


def flatten(config, prefix=""):  # the reverse of nest
    out = {}
    for key, value in config.items():
        out.update(flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def _loso_config(values):
    """(LosoConfig, None), or (None, why LosoConfig or the model refuse it)."""
    try:
        return LosoConfig.from_dict(values), None
    except (UserError, TypeError, ValueError, ArithmeticError, RuntimeError) as e:
        return None, first_line(e) if isinstance(e, UserError) else f"{type(e).__name__}: {first_line(e)}"


def _execute(text, source):
    namespace = {"__name__": f"search_space_{Path(source).stem}", "__file__": source}
    try:
        exec(compile(text, source, "exec"), namespace)  # noqa: S102 - the user's own space file
    except Exception as e:  # noqa: BLE001
        raise _failure(e, source, "loading it") from None
    return namespace


def _failure(error, source, what):
    """One line for an exception out of the space file, at its line there (which names the parameter)."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if f.filename == source]
    where = f"{source}, line {frames[-1].lineno}" + (f" ({frames[-1].line})" if frames[-1].line else "") \
        if frames else source
    return UserError(f"{where}: {what} raised {type(error).__name__}: {first_line(error)}")


def _mapping(value, where, key):
    if not isinstance(value, dict):
        raise UserError(f"{where}: {key}: expected a dict, got {value!r:.80}")
    return value


def _number(value, kind, op, bound, where):
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) or \
            not math.isfinite(value) or not (value > bound if op == ">" else value >= bound):
        raise UserError(f"{where}: expected {'an integer' if kind is int else 'a number'} {op} {bound}, got {value!r}")
    return kind(value)


def _build(classes, kind, options, where):
    if kind not in classes:
        raise UserError(f"{where}: unknown type {kind!r} (known: {', '.join(classes)})")
    try:
        return classes[kind](**options)
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: {first_line(e)}") from None
