"""Search space files: parsing, one-line errors naming the key, sampling that keeps conditions."""
import optuna
import pytest
import yaml

from htnet.errors import UserError
from search.space import SPACES_DIR, flatten, load_space, parse_space, set_fixed, with_overrides

from search_fixtures import TINY_FIXED, run_cli

optuna.logging.set_verbosity(optuna.logging.WARNING)

HTNET_SPACE = {
    "fixed": {"epochs": 2, "model_config.num_hierarchies": {"value": 1, "when": "model == 'htnet'"}},
    "space": {
        "model": {"choice": ["htnet", "ststnet"]},
        "lr": {"low": "1e-4", "high": 1.0e-2, "log": True},
        "model_config.dim": {"choice": [56, 112, 196, 256, 392, 512], "when": "model == 'htnet'"},
        "model_config.heads": {"low": 1, "high": 6, "when": "model == 'htnet'"},
        "model_config.patch_size": {"low": 2, "high": 14, "when": "model == 'htnet'"},
        "model_config.block_repeats": {"choice": [[1], [2]], "when": "model == 'htnet'"},
        "model_config.dropout": {"low": 0.0, "high": 0.5, "when": "model == 'htnet'"},
    },
    "conditions": ["model_config.dim % model_config.heads == 0",
                   "image_size % model_config.patch_size == 0"],
}


def sample_many(space, n=60, seed=0):
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=seed))
    values = []
    for _ in range(n):
        trial = study.ask()
        values.append(space.sample(trial))
        study.tell(trial, 0.0)
    return values, study


def test_shipped_spaces_load():
    demo = load_space(SPACES_DIR / "demo.yaml")
    assert demo.objective == "inner" and demo.metric == "inner_val_uf1"
    assert demo.sampler["type"] == "tpe" and demo.sampler["seed"] == 0
    assert demo.pruner["type"] == "median"
    paper = load_space("htnet")  # a bare name finds search/spaces/htnet.yaml
    assert paper.names[:2] == ["model_config.dim", "model_config.heads"]
    dims = next(p for p in paper.params if p.name == "model_config.dim")
    assert dims.choices == [56, 112, 196, 256, 392, 512]
    heads = next(p for p in paper.params if p.name == "model_config.heads")
    assert (heads.kind, heads.low, heads.high) == ("int", 1, 6)
    assert {"lr", "batch_size", "epochs", "weight_decay", "model_config.patch_size",
            "model_config.block_repeats", "model_config.mlp_mult", "model_config.dropout"} <= set(paper.names)
    assert next(p for p in paper.params if p.name == "lr").log


def test_sampling_keeps_conditions_and_when():
    space = parse_space(HTNET_SPACE, "t.yaml")
    values, study = sample_many(space, 80)
    htnet = [v for v in values if v["model"] == "htnet"]
    ststnet = [v for v in values if v["model"] == "ststnet"]
    assert htnet and ststnet
    for v in htnet:
        assert v["model_config.dim"] % v["model_config.heads"] == 0
        assert 28 % v["model_config.patch_size"] == 0
        assert v["model_config.block_repeats"] in ([1], [2])  # lists travel to Optuna as JSON text
        assert 1e-4 <= v["lr"] <= 1e-2
    assert {v["model_config.patch_size"] for v in htnet} <= {2, 4, 7, 14}
    assert all(set(v) == {"model", "lr"} for v in ststnet)  # `when` leaves HTNet's keys out
    config = space.resolve(htnet[0])
    assert config["model_config"]["num_hierarchies"] == 1 and config["epochs"] == 2
    assert "num_hierarchies" not in space.resolve(ststnet[0]).get("model_config", {})
    # Optuna keeps one fixed choice list per parameter name: heads filtered by dim is recorded
    # under a name carrying the dim it was filtered for.
    names = {name for t in study.trials for name in t.params}
    assert any(n.startswith("model_config.heads|model_config.dim=") for n in names)
    assert "model_config.patch_size" in names


def test_grid_enumerates_valid_points_only():
    raw = {"sampler": {"type": "grid"}, "fixed": {"model": "ststnet"},
           "space": {"batch_size": {"choice": [16, 32]}, "epochs": {"low": 1, "high": 6},
                     "shuffle": {"choice": [True, False]}},
           "conditions": ["epochs % 2 == 0 or batch_size == 16"]}
    space = parse_space(raw, "g.yaml")
    points = space.grid_points()
    assert len(points) == 2 * (6 + 3)
    assert all(p["epochs"] % 2 == 0 or p["batch_size"] == 16 for p in points)
    study = optuna.create_study(sampler=space.make_sampler())
    seen = []
    for _ in range(len(points)):
        trial = study.ask()
        seen.append(space.sample_grid_point(trial))
        try:
            study.tell(trial, 0.0)
        except RuntimeError as e:  # GridSampler stops the study after the last grid point
            assert "Study.stop" in str(e)
    assert sorted(map(str, seen)) == sorted(map(str, points))


def test_overrides_and_sets():
    space = parse_space({"fixed": dict(TINY_FIXED), "space": {"lr": {"low": 1e-3, "high": 1e-2}}}, "o.yaml")
    changed = with_overrides(space, num_samples=7, objective="paper", sampler="random", seed=3,
                             resources={"gpu": 0.25})
    assert (changed.num_samples, changed.metric, changed.sampler) == (7, "paper_full_uf1", {"type": "random", "seed": 3})
    assert changed.resources == {"cpu": 1.0, "gpu": 0.25}
    fixed = set_fixed(space, ["epochs=9", "model_config.dim=64", "protocols=[inner]"])
    config = fixed.resolve({"lr": 1e-3})
    assert config["epochs"] == 9 and config["model_config"] == {"dim": 64}
    assert flatten(config)["model_config.dim"] == 64
    with pytest.raises(UserError, match="--set lr: lr is sampled"):
        set_fixed(space, ["lr=0.1"])
    with pytest.raises(UserError, match="'paper' objective needs the 'paper' protocol"):
        with_overrides(set_fixed(space, ["protocols=[inner]"]), objective="paper")


@pytest.mark.parametrize("raw, message", [
    ({"spaces": {}}, "t.yaml: unknown key 'spaces'"),
    ({"space": {"lr": {"choice": []}}}, "t.yaml: space.lr.choice: empty choice list"),
    ({"space": {"lr": {"low": 0.1, "high": 0.01}}}, "t.yaml: space.lr: low 0.1 > high 0.01"),
    ({"space": {"lr": {"low": 0.0, "high": 0.01, "log": True}}}, "t.yaml: space.lr: log scale needs low > 0"),
    ({"space": {"model": {"choice": ["htnet", "resnet"]}}}, "t.yaml: space.model: unknown model 'resnet'"),
    ({"fixed": {"model": "resnet"}}, "t.yaml: fixed.model: unknown model 'resnet'"),
    ({"space": {"learning_rate": {"low": 0.1, "high": 1.0}}}, "t.yaml: space.learning_rate: unknown key 'learning_rate'"),
    ({"space": {"lr": {"low": 0.1, "hi": 1.0}}}, "t.yaml: space.lr: unknown key 'hi'"),
    ({"space": {"lr": {"low": "fast", "high": 1.0}}}, "t.yaml: space.lr.low: expected a number"),
    ({"space": {"epochs": {"low": 1, "high": 5}}, "conditions": ["epochs % heads == 0"]},
     "t.yaml: conditions\\[0\\]: unknown name 'heads'"),
    ({"space": {"epochs": {"low": 1, "high": 5}}, "conditions": ["__import__('os')"]},
     "t.yaml: conditions\\[0\\]: Call is not allowed"),
    ({"space": {"epochs": {"choice": [3, 5]}}, "conditions": ["epochs % 2 == 0"]},
     "t.yaml: space.epochs: no value satisfies the conditions"),
    ({"space": {"lr": {"low": 0.1, "high": 1.0}}, "conditions": ["lr < 0.5"]},
     "t.yaml: conditions\\[0\\]: lr is a float range"),
    ({"fixed": {"protocols": ["paper"]}}, "t.yaml: fixed.protocols: the 'inner' objective needs"),
    ({"pruner": {"type": "median", "n_startup": 2}}, "t.yaml: pruner: .*n_startup"),
    ({"pruner": {"type": "patient"}}, "t.yaml: pruner: patient needs 'patience'"),
    ({"sampler": {"type": "cmaes"}}, "t.yaml: sampler.type: unknown sampler 'cmaes'"),
    ({"resources": {"gpu": -1}}, "t.yaml: resources.gpu: expected a number >= 0, got -1"),
    ({"num_samples": 0}, "t.yaml: num_samples: expected an integer >= 1"),
    ({"sampler": "grid", "space": {"lr": {"low": 0.1, "high": 1.0}}}, "t.yaml: space.lr: a float range cannot be enumerated"),
    ({"space": {"model": {"choice": ["ststnet"]}, "model_config.dim": {"choice": [8], "when": "modell == 'htnet'"}}},
     "t.yaml: space.model_config.dim.when: 'modell' is not"),
    ({"pruner": {"type": "wilcoxon", "p_threshold": 2}},
     "t.yaml: pruner: p_threshold must be between 0 and 1"),
])
def test_bad_space_is_one_line_naming_the_key(raw, message):
    with pytest.raises(UserError, match=message) as info:
        parse_space(raw, "t.yaml")
    assert "\n" not in str(info.value)


def test_pruner_types_build():
    for spec in ({"type": "median"}, {"type": "successive_halving", "min_resource": 1},
                 {"type": "hyperband", "min_resource": 1, "max_resource": 6},
                 {"type": "patient", "patience": 2, "wrapped": {"type": "median"}},
                 {"type": "percentile", "percentile": 25.0}, {"type": "wilcoxon", "p_threshold": 0.2},
                 {"type": "none"}):
        pruner = parse_space({"pruner": spec}, "p.yaml").make_pruner()
        assert isinstance(pruner, optuna.pruners.BasePruner)


@pytest.mark.parametrize("rejudge", [False, True])
def test_rejudging_successive_halving_prunes_the_trial_that_passed_a_rung_unopposed(rejudge):
    """The cpu-study's order, on a real Optuna study: trial A (fast, poor) reaches rungs 4 and 12 alone; B
    reaches 4 with a far better value. Plain successive halving lets A go on (it passed unopposed); with
    `rejudge`, A's next report prunes it. B, better than all at its rung, is never pruned."""
    spec = {"type": "successive_halving", "min_resource": 4, "reduction_factor": 3, "rejudge": rejudge}
    study = optuna.create_study(direction="maximize",
                                pruner=parse_space({"pruner": spec}, "p.yaml").make_pruner())
    a, b = study.ask(), study.ask()
    for step, value in ((4, 0.37), (8, 0.40), (12, 0.42)):
        a.report(value, step)
        assert not a.should_prune()   # alone at every rung
    b.report(0.75, 4)
    assert not b.should_prune()
    a.report(0.43, 16)
    assert a.should_prune() is rejudge
    study.tell(a, state=optuna.trial.TrialState.PRUNED if rejudge else optuna.trial.TrialState.COMPLETE,
               values=None if rejudge else 0.43)
    b.report(0.74, 8)
    assert not b.should_prune()
    with pytest.raises(UserError, match=r"p.yaml: pruner.rejudge: expected true or false, got 'yes'"):
        parse_space({"pruner": {**spec, "rejudge": "yes"}}, "p.yaml")


def test_bad_yaml_file_and_cli_exit_code(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("space:\n  lr: {low: 1.0, high: [\n")
    with pytest.raises(UserError, match="bad.yaml: line .*not valid YAML"):
        load_space(bad)
    bad.write_text(yaml.safe_dump({"space": {"lr": {"choice": []}}}))
    result = run_cli(["run", str(bad), "--storage", str(tmp_path / "runs")], timeout=120)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1] == f"error: {bad}: space.lr.choice: empty choice list"
    missing = run_cli(["run", str(tmp_path / "nope.yaml")], timeout=120)
    assert missing.returncode == 2 and "error: search space file not found" in missing.stderr


def test_cli_help():
    for args in (["--help"], ["run", "--help"], ["resume", "--help"], ["status", "--help"]):
        result = run_cli(args, timeout=60)
        assert result.returncode == 0 and "usage: python -m search" in result.stdout
    assert "--gpus-per-trial" in run_cli(["run", "--help"], timeout=60).stdout


def test_every_sampled_htnet_configuration_builds():
    """The conditions of search/spaces/htnet.yaml keep every sample a valid HTNet (built on the
    meta device: no memory, no time)."""
    import torch

    from htnet.loso import LosoConfig

    space = load_space(SPACES_DIR / "htnet.yaml")
    values, study = sample_many(space, 150, seed=1)
    assert len({(v["model_config.num_hierarchies"], v["model_config.patch_size"]) for v in values}) >= 3
    with torch.device("meta"):
        for v in values:
            config = LosoConfig.from_dict(space.resolve(v))  # validate() creates the model
            assert config.model == "htnet"
            assert len(config.model_config["block_repeats"]) == config.model_config["num_hierarchies"]


PAPER_POINT = {"model_config.dim": 256, "model_config.heads": 3, "lr": 5e-5, "batch_size": 256, "epochs": 800,
               "weight_decay": 0.0, "model_config.num_hierarchies": 3, "model_config.block_repeats": [2, 2, 10],
               "model_config.patch_size": 7, "model_config.mlp_mult": 4, "model_config.dropout": 0.0}


def test_the_paper_config_is_a_point_of_htnet_yaml():
    """Every value of the HTNet paper's config lies in its parameter's range and passes the conditions
    given the values before it, and the resolved config builds the reference model."""
    import torch

    from htnet.loso import LosoConfig

    space = load_space("htnet")
    assert set(PAPER_POINT) == set(space.names)
    env = space.fixed_env()
    for param in space.params:
        value = PAPER_POINT[param.name]
        if param.kind == "float":
            assert param.low <= value <= param.high, param.name
        else:
            assert value in (param.allowed(env) if param.conditions else param.values()), param.name
        env[param.name] = value
    with torch.device("meta"):
        config = LosoConfig.from_dict(space.resolve(PAPER_POINT))
    assert config.model_config["dim"] == 256 and config.model_config["heads"] == 3
    assert not any(c for c in space.raw.get("conditions", []) if "% model_config.heads" in c)


def test_tpe_with_concurrent_trials_uses_the_constant_liar():
    """htnet.yaml runs 16 trials at once: TPE must treat the running ones as observed (Optuna's
    constant_liar, on by default in Optuna 5) or it samples near-duplicates; a space file can turn it off."""
    import copy

    space = load_space("htnet")
    assert space.max_concurrent_trials > 1 and space.sampler["type"] == "tpe"
    assert space.make_sampler()._constant_liar is True
    raw = copy.deepcopy(space.raw)
    raw["sampler"] = {**raw["sampler"], "constant_liar": False}
    assert parse_space(raw, "off.yaml").make_sampler()._constant_liar is False
