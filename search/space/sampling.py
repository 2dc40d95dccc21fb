"""A parsed space's Optuna side: suggestions (define-by-run or a grid), its sampler and pruner, and the
LOSO config a sample resolves to. Mixed into schema.Param and schema.SearchSpace."""
import inspect
import itertools
import json
import math
import warnings

from htnet.errors import UserError, first_line

BUILTINS = {"image_size": 28}
MAX_ENUMERATION = 100_000
MAX_EVALUATIONS = 500_000  # condition evaluations a grid or a load-time check may spend
PRUNERS = {"median": "MedianPruner", "percentile": "PercentilePruner", "successive_halving": "SuccessiveHalvingPruner",
           "hyperband": "HyperbandPruner", "wilcoxon": "WilcoxonPruner", "patient": "PatientPruner",
           "none": "NopPruner"}


def optuna_value(value):
    """Optuna's choices must be None/bool/int/float/str: others travel as JSON text."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value, default=str)  # default: a YAML date, set, ...


class ParamSampling:
    def values(self):
        """All candidate values of a choice or int range."""
        if self.kind == "choice":
            return list(self.choices)
        if self.kind == "int":
            values = range(int(self.low), int(self.high) + 1, int(self.step or 1))
            if len(values) > MAX_ENUMERATION:
                raise UserError(f"{self.where}: an int range of {len(values)} values is too large to enumerate")
            return list(values)
        raise UserError(f"{self.where}: a float range cannot be enumerated (grid search or a "
                        f"condition needs a choice list or an int range)")

    def allowed(self, env):
        """Candidate values that satisfy this parameter's conditions, given earlier values."""
        return [v for v in self.values() if all(c.holds({**env, self.name: v}) for c in self.conditions)]

    def suggest(self, trial, env):
        """Optuna needs a fixed set of choices per name: a parameter its conditions filter by earlier values
        is suggested under a name carrying those values (`model_config.heads|model_config.dim=112`)."""
        if self.kind == "int" and not self.conditions:
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        if self.kind == "float":
            return trial.suggest_float(self.name, float(self.low), float(self.high), step=self.step, log=self.log)
        values, label = self.allowed(env) if self.conditions else self.choices, self.name
        if not values:
            context = ", ".join(f"{d}={env.get(d)!r}" for d in self.depends)
            raise UserError(f"{self.where}: no value satisfies the conditions when {context}")
        if self.depends:
            label += "|" + ",".join(f"{d}={optuna_value(env.get(d))}" for d in self.depends)
        encoded = [optuna_value(v) for v in values]
        return values[encoded.index(trial.suggest_categorical(label, encoded))]


class SpaceSampling:
    def fixed_env(self):
        """The builtins and the fixed values without `when`: what every sample starts from."""
        return {**BUILTINS, **{f.name: f.value for f in self.fixed if f.when is None}}

    def sample(self, trial):
        """Define-by-run: suggest every applicable parameter on the Optuna trial itself (OptunaSearch's wrapper
        would record the context names and JSON text), so the Ray config is the returned values."""
        trial = getattr(trial, "ot_trial", trial)
        env, values = self.fixed_env(), {}
        for param in self.params:
            if param.when is None or param.when.holds(env, missing=False):
                env[param.name] = values[param.name] = param.suggest(trial, env)
        return values

    def optuna_space(self):
        """What OptunaSearch(space=...) takes: a define-by-run function."""
        return self.sample_grid_point if self.sampler["type"] == "grid" else self.sample

    def grid_points(self):
        """Every valid configuration of an all-discrete space, in a stable order."""
        points, evaluations = [{}], 0
        for param in self.params:
            grown = []
            for point in points:
                env = {**self.fixed_env(), **point}
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
        return ", ".join(f"{k}={optuna_value(v)}" for k, v in point.items()) or "(fixed)"

    def sample_grid_point(self, trial):
        trial = getattr(trial, "ot_trial", trial)
        points = self.grid_points()
        labels = [self.grid_label(p) for p in points]
        return dict(points[labels.index(trial.suggest_categorical("grid_point", labels))])

    def sampled(self, config):
        """The sampled values (plain names) out of a Ray Tune trial config."""
        return {name: config[name] for name in self.names if name in config}

    def resolve(self, sampled, overrides=None):
        """Sampled values + fixed values -> a LosoConfig dict (model_config nested)."""
        env, flat = {**BUILTINS, **sampled}, {}
        for item in sorted(self.fixed, key=lambda f: f.when is not None):  # a `when` sees the plain fixed values
            if item.when is None or item.when.holds(env, missing=False):
                env[item.name] = flat[item.name] = item.value
        return nest({**flat, **sampled, **(overrides or {})})

    def check_conditions(self):
        """Every combination of earlier discrete values must leave a filtered parameter a value."""
        by_name = {p.name: p for p in self.params}
        for param in self.params:
            deps = [by_name[d] for d in param.depends]
            if not param.conditions or any(d.kind == "float" for d in deps):
                continue
            domains = [d.values() for d in deps]
            cost = min(math.prod(map(len, domains)), MAX_ENUMERATION) * len(param.values()) * len(param.conditions)
            if cost > MAX_EVALUATIONS:
                raise UserError(f"{self.source}: space.{param.name}: checking its conditions takes {cost:,} "
                                f"evaluations (limit {MAX_EVALUATIONS:,}): narrow the ranges or list choices")
            for combo in itertools.islice(itertools.product(*domains), MAX_ENUMERATION):
                if not param.allowed({**self.fixed_env(), **{d.name: v for d, v in zip(deps, combo)}}):
                    context = ", ".join(f"{d.name}={v!r}" for d, v in zip(deps, combo)) or "the fixed values"
                    raise UserError(f"{self.source}: space.{param.name}: no value satisfies the conditions "
                                    f"when {context}")

    def make_sampler(self):
        import optuna

        options = {k: v for k, v in self.sampler.items() if k != "type"}
        kind = self.sampler["type"]
        cls = getattr(optuna.samplers, {"tpe": "TPESampler", "random": "RandomSampler", "grid": "GridSampler"}[kind])
        grid = [{"grid_point": [self.grid_label(p) for p in self.grid_points()]}] if kind == "grid" else []
        return build(cls, f"{self.source}: sampler", grid, options)

    def make_pruner(self):
        return make_pruner(self.pruner, f"{self.source}: pruner")


def make_pruner(spec, where):
    """The Optuna pruner a space file's `pruner:` mapping names (`patient` wraps another: `wrapped`)."""
    import optuna

    spec = dict(spec)
    kind = spec.pop("type", "median")
    if kind not in PRUNERS:
        raise UserError(f"{where}: unknown type {kind!r} (known: {', '.join(PRUNERS)})")
    cls = getattr(optuna.pruners, PRUNERS[kind])
    if kind == "successive_halving":   # Optuna's, with `rejudge` (search.space.pruners)
        from search.space.pruners import SuccessiveHalvingPruner as cls
    # Wilcoxon ("experimental since v3.6.0") and Patient ("since v2.8") are stable in use
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        inner = []
        if kind == "patient":
            wrapped = spec.pop("wrapped", None)
            if wrapped is not None and not isinstance(wrapped, dict):
                raise UserError(f"{where}.wrapped: expected a mapping like {{type: median}}")
            if "patience" not in spec:
                raise UserError(f"{where}: patient needs 'patience' (reports without improvement)")
            inner = [make_pruner(wrapped, f"{where}.wrapped") if wrapped else None]
        return build(cls, where, inner, spec)


def build(cls, where, args, options):
    """cls(*args, **options), its YAML options checked against its annotations first (`n_startup_trials: 2.0`,
    `seed: true`, `p_threshold: .nan`: one line naming the key); what it refuses is one line too."""
    parameters = inspect.signature(cls).parameters
    words = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "text", "None": "null"}
    for key, value in options.items():
        annotation = parameters[key].annotation if key in parameters else inspect.Parameter.empty
        if annotation is inspect.Parameter.empty:
            continue
        kinds = [k.strip() for k in str(getattr(annotation, "__name__", annotation)).split("|")]
        integer = isinstance(value, int) and not isinstance(value, bool)
        ok = (value is None and "None" in kinds) or (isinstance(value, bool) and "bool" in kinds) or \
            (isinstance(value, str) and "str" in kinds) or (integer and ("int" in kinds or "float" in kinds)) or \
            (isinstance(value, float) and math.isfinite(value) and "float" in kinds)
        if not ok:
            raise UserError(f"{where}.{key}: expected {' or '.join(words.get(k, k) for k in kinds)}, got {value!r}")
    try:
        return cls(*args, **options)
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: {e}") from None


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
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def trial_config(space, config, overrides=None):
    """The LosoConfig of a trial's sampled `config` (what the trainable runs, and what its MLflow run records);
    whatever rejects it raises one UserError, so the trial fails once and is not retried (building a config is
    deterministic)."""
    from htnet.loso import LosoConfig

    try:
        return LosoConfig.from_dict(space.resolve(space.sampled(config), overrides))
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001
        raise UserError(f"invalid configuration: {type(e).__name__}: {first_line(e)}") from None
