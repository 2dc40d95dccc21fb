"""Search space files (define-by-run Python): loading, settings, CLI flags and --set, the start-up check that samples
the space and builds every config on the meta device, and one-line errors naming the file and the parameter."""
import pickle
import textwrap

import optuna
import pytest

from htnet.errors import UserError
from search import cli
from search.space import OBJECTIVES, SPACES_DIR, check, load_space, make_pruner, trial_config, with_settings

from search_fixtures import run_cli, write_space

optuna.logging.set_verbosity(optuna.logging.WARNING)

SETTINGS = "num_samples = 4\nfixed = {'model': 'ststnet', 'epochs': 2, 'device': 'cpu'}\n"


def space_file(tmp_path, body, settings=SETTINGS, name="s.py"):
    """A space file: `settings`, then `body` (its space function and anything else)."""
    path = tmp_path / name
    path.write_text(settings + textwrap.dedent(body))
    return path


def test_shipped_spaces_load_and_pass_the_check():
    demo = load_space(SPACES_DIR / "demo.py")
    assert (demo.objective, demo.metric, demo.num_samples) == ("inner", "inner_val_uf1", 12)
    assert demo.sampler == {"type": "tpe", "seed": 0, "n_startup_trials": 5} and demo.pruner["type"] == "median"
    assert demo.resources == {"cpu": 1.0, "gpu": 0.0} and demo.data == {"synthetic_subjects": 3, "synthetic_seed": 0}
    models = {config.model for _, config in check(demo)}
    assert models == {"htnet", "ststnet"}
    cpu = load_space("htnet-cpu")  # a bare name finds search/spaces/htnet-cpu.py
    assert cpu.pruner == {"type": "successive_halving", "min_resource": 4, "reduction_factor": 3, "rejudge": True}
    assert cpu.fixed["model_config.num_hierarchies"] == 3 and all(c.model == "htnet" for _, c in check(cpu))
    assert isinstance(cpu.make_pruner(), optuna.pruners.BasePruner)


def test_every_htnet_draw_builds_and_keeps_the_model_constraints():
    """search/spaces/htnet.py's plain-Python constraints: block repeats as many as the levels, patch 14 only with
    two levels; every draw builds (on the meta device) and the draws cover both level counts and both patches."""
    space = load_space("htnet")
    draws = check(space)
    assert len(draws) >= 32
    for sampled, config in draws:
        model = config.model_config
        assert len(model["block_repeats"]) == model["num_hierarchies"]
        assert model["patch_size"] == 7 or model["num_hierarchies"] == 2
        assert 1 <= model["heads"] <= 6 and 1e-5 <= config.lr <= 1e-3
    assert {(c.model_config["num_hierarchies"], c.model_config["patch_size"]) for _, c in draws} >= {(2, 7), (2, 14),
                                                                                                      (3, 7)}


PAPER_POINT = {"model_config.dim": 256, "model_config.heads": 3, "lr": 5e-5, "batch_size": 256, "epochs": 800,
               "weight_decay": 0.0, "model_config.num_hierarchies": 3, "model_config.block_repeats": [2, 2, 10],
               "model_config.patch_size": 7, "model_config.mlp_mult": 4, "model_config.dropout": 0.0}


def test_the_paper_config_is_a_point_of_htnet_space():
    """The HTNet paper's config, asked of Optuna by its parameter names, is what space() returns, and it builds."""
    space = load_space("htnet")
    study = optuna.create_study()
    study.enqueue_trial({**{k: v for k, v in PAPER_POINT.items() if k != "model_config.block_repeats"},
                         "block_repeats_3_levels": "2-2-10"})
    sampled = space.sample(study.ask())
    assert sampled == PAPER_POINT
    config = space.config(sampled)
    assert config.model_config["dim"] == 256 and config.model_config["heads"] == 3


def test_a_conditional_parameter_is_a_plain_if(tmp_path):
    """HTNet's parameters only where model is htnet: the STSTNet draws lack them, Optuna records them only there."""
    path = space_file(tmp_path, """
        def space(trial):
            config = {"model": trial.suggest_categorical("model", ["htnet", "ststnet"]),
                      "lr": trial.suggest_float("lr", 1e-4, 1e-2, log=True)}
            if config["model"] == "htnet":
                config["model_config"] = {"dim": trial.suggest_categorical("dim", [16, 32]), "heads": 2,
                                          "num_hierarchies": 1, "block_repeats": [1]}
            return config
        """, settings="fixed = {'epochs': 2}\n")
    draws = check(load_space(path))
    htnet = [s for s, _ in draws if s["model"] == "htnet"]
    ststnet = [s for s, _ in draws if s["model"] == "ststnet"]
    assert htnet and ststnet
    assert all(set(s) == {"model", "lr"} for s in ststnet)
    assert all(s["model_config.dim"] in (16, 32) and s["model_config.heads"] == 2 for s in htnet)  # flattened
    config = next(c for s, c in draws if s["model"] == "htnet")
    assert config.model_config == {"dim": config.model_config["dim"], "heads": 2, "num_hierarchies": 1,
                                   "block_repeats": [1]} and config.epochs == 2


def test_grid_sampler_runs_at_most_its_points(tmp_path):
    path = write_space(tmp_path / "g.py", num_samples=10, sampler={"type": "grid"},
                       space={"batch_size": {"choice": [16, 32]}, "seed": {"choice": [1, 2, 3]}})
    space = load_space(path)
    assert space.num_samples == 6 and space.grid == {"batch_size": [16, 32], "seed": [1, 2, 3]}
    study = optuna.create_study(sampler=space.make_sampler())
    seen = set()
    for _ in range(6):
        trial = study.ask()
        seen.add(tuple(space.sample(trial).values()))
        study.tell(trial, 0.0) if len(seen) < 6 else None  # GridSampler stops the study after the last point
    assert seen == {(b, s) for b in (16, 32) for s in (1, 2, 3)}


def test_cli_flags_and_sets_are_checked_where_they_enter(tmp_path):
    space = load_space(write_space(tmp_path / "o.py"))
    changed = with_settings(space, ["epochs=9", "model_config.dropout=0.25"], gpus=0.25, num_samples=7,
                            objective="final", sampler="tpe", seed=3, pruner="median")
    assert (changed.num_samples, changed.metric, changed.sampler) == (7, "final_full_uf1", {"type": "tpe", "seed": 3})
    assert changed.resources == {"cpu": 1.0, "gpu": 0.25} and changed.pruner == {"type": "median"}
    assert OBJECTIVES["final"] == "final_full_uf1" and space.num_samples == 2  # a copy
    [(sampled, config), *_] = check(changed)
    assert config.epochs == 9 and config.model_config == {"dropout": 0.25}
    assert trial_config(changed, sampled).to_dict() == config.to_dict()
    with pytest.raises(UserError, match=r"^--set epochs: epochs must be a positive integer, got 0$"):
        with_settings(space, ["epochs=0"])
    with pytest.raises(UserError, match=r"^--set lr: space\(\) in .*o.py samples it; edit the space file instead$"):
        check(with_settings(space, ["lr=0.1"]))
    with pytest.raises(UserError, match=r"o.py: protocols: the 'paper' objective needs the 'paper' protocol"):
        check(with_settings(space, ["protocols=[inner]"], objective="paper"))
    with pytest.raises(UserError, match=r"o.py: grid: the grid sampler needs grid = {parameter name: \[values\]}"):
        with_settings(space, sampler="grid")


def test_a_space_travels_as_its_text():
    """Ray pickles the searcher (and with it space()) with the standard pickle: the function goes as the file."""
    space = load_space("demo")
    copy = pickle.loads(pickle.dumps(space.optuna_space()))
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1)).ask()
    assert copy(trial)["model"] in ("htnet", "ststnet") and copy.__self__.text == space.text


BAD = {  # name -> (file body, settings or None for SETTINGS, the error line's text after the file's path)
    "syntax error": ("def space(trial)\n    return {}\n", None, ": loading it raised SyntaxError: "),
    "import error": ("import no_such_module\n", None,
                     ", line 3 (import no_such_module): loading it raised ModuleNotFoundError: "
                     "No module named 'no_such_module'"),
    "no space function": ("", None, ": no function space(trial)"),
    "space() raises": ("def space(trial):\n    lr = trial.suggest_float('lr', 1.0, 0.1)\n    return {'lr': lr}\n",
                       None, ", line 4 (lr = trial.suggest_float('lr', 1.0, 0.1)): space() raised ValueError: "),
    "space() returns a list": ("def space(trial):\n    return ['lr']\n", None,
                               ": space() must return a dict of LOSO config keys, got ['lr']"),
    "a bad value for a parameter": ("def space(trial):\n    return {'epochs': trial.suggest_float('epochs', 1, 4)}\n",
                                    None, ": space() -> epochs: epochs must be an integer, got "),
    "an unknown key": ("def space(trial):\n    return {'learning_rate': 0.1}\n", None,
                       ": space() -> learning_rate: unknown LOSO config key 'learning_rate'"),
    "a model the config cannot build": (
        "def space(trial):\n    return {'model': 'htnet', 'model_config.patch_size': 5}\n", None,
        ": model='htnet', model_config.patch_size=5: htnet: image_size 28 is not divisible by patch_size 5"),
    "choices that change": (
        "def space(trial):\n    n = trial.suggest_int('n', 1, 2)\n"
        "    return {'batch_size': trial.suggest_categorical('batch_size', [16] * n)}\n",
        None, ", line 5 (return {'batch_size': trial.suggest_categorical('batch_size', [16] * n)}): space() raised "
              "ValueError: CategoricalDistribution does not support dynamic value space"),
    "a bad fixed value": ("def space(trial):\n    return {}\n", "fixed = {'epochs': 1.0}\n",
                          ": fixed.epochs: epochs must be an integer, got 1.0"),
    "an unknown setting": ("def space(trial):\n    return {}\n", "num_sample = 4\n", ": unknown setting 'num_sample'"),
    "num_samples 0": ("def space(trial):\n    return {}\n", "num_samples = 0\n",
                      ": num_samples: expected an integer >= 1, got 0"),
    "unknown objective": ("def space(trial):\n    return {}\n", "objective = 'best'\n",
                          ": objective: expected one of inner, paper, final, got 'best'"),
    "resources gpu -1": ("def space(trial):\n    return {}\n", "resources = {'gpu': -1}\n",
                         ": resources.gpu: expected a number >= 0, got -1"),
    "unknown sampler": ("def space(trial):\n    return {}\n", "sampler = 'cmaes'\n",
                        ": sampler: unknown type 'cmaes' (known: tpe, random, grid)"),
    "bad pruner argument": ("def space(trial):\n    return {}\n", "pruner = {'type': 'median', 'n_startup': 2}\n",
                            ": pruner: MedianPruner.__init__() got an unexpected keyword argument 'n_startup'"),
    "patient without patience": ("def space(trial):\n    return {}\n", "pruner = {'type': 'patient'}\n",
                                 ": pruner: PatientPruner.__init__() missing 1 required positional argument"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_space_file_is_one_line_naming_the_file_and_parameter(case, tmp_path):
    body, settings, message = BAD[case]
    path = space_file(tmp_path, body, SETTINGS if settings is None else settings)
    with pytest.raises(UserError) as info:
        check(load_space(path))
    assert str(info.value).startswith(f"{path}{message}"), str(info.value)
    assert "\n" not in str(info.value)


def test_a_space_file_is_python(tmp_path):
    (tmp_path / "old.yaml").write_text("num_samples: 2\n")
    with pytest.raises(UserError, match=r"old.yaml: a search space is a Python file \(see search/spaces/demo.py\)"):
        load_space(tmp_path / "old.yaml")
    with pytest.raises(UserError, match=r"nope.py: no such file"):
        load_space(tmp_path / "nope.py")


def test_pruner_types_build():
    for spec in ({"type": "median"}, {"type": "successive_halving", "min_resource": 1, "rejudge": True},
                 {"type": "hyperband", "min_resource": 1, "max_resource": 6},
                 {"type": "patient", "patience": 2, "wrapped": {"type": "median"}},
                 {"type": "percentile", "percentile": 25.0}, {"type": "wilcoxon", "p_threshold": 0.2},
                 {"type": "none"}):
        assert isinstance(make_pruner(spec, "p"), optuna.pruners.BasePruner)
    with pytest.raises(UserError, match=r"^p: unknown type 'asha'"):
        make_pruner({"type": "asha"}, "p")


def test_cli_help(capsys):
    result = run_cli(["run", "--help"], timeout=60)   # one real process; the other commands' help in this one
    assert result.returncode == 0 and "usage: python -m search run" in result.stdout
    assert "--gpus-per-trial" in result.stdout and "{inner,paper,final}" in result.stdout
    for args in (["--help"], ["resume", "--help"], ["status", "--help"]):
        with pytest.raises(SystemExit) as exit:
            cli.main(args)
        assert exit.value.code == 0 and "usage: python -m search" in capsys.readouterr().out
