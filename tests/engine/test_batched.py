"""The fold-batched engine (htnet.engine with groups of G > 1) and the grouped models (htnet.models.grouped)."""
import pandas as pd
import pytest
import torch
import yaml

from htnet.engine import (CPU_GROUP_CAP, make_groups, member_bytes, plan_groups, plan_members,
                          resolve_fold_group_size, worker_count)
from htnet.loso import LosoConfig, evaluate_weights, make_folds, run_loso
from htnet.metrics import per_subject_accuracy
from htnet.models import create_model
from htnet.models.grouped import dropout_mask, grouped_model, keep_members, member_state, unstack

from conftest import TINY_STSTNET

TINY_HTNET = {"dim": 8, "heads": 2, "patch_size": 14, "num_hierarchies": 2, "block_repeats": [1, 1]}
MODELS = [("ststnet", {}), ("htnet", TINY_HTNET),
          ("htnet", {"dim": 12, "heads": 3, "block_repeats": [1, 1, 2], "mlp_mult": 2}),
          ("offapexnet", {}), ("dual_inception", {})]


def plain_models(name, config, count, negative_gamma=True):
    models = []
    for g in range(count):
        torch.manual_seed(100 + g)
        model = create_model(name, **config)
        if name == "ststnet":  # trained-looking BatchNorm state, one negative scale (min-pool path)
            for bn in (model.bn1, model.bn2, model.bn3):
                bn.running_mean.uniform_(0, 40)
                bn.running_var.uniform_(20, 400)
                bn.weight.data.uniform_(0.5, 1.5)
            if negative_gamma:
                model.bn2.weight.data[1] = -0.7
        models.append(model)
    return models


@pytest.mark.parametrize("name, config", MODELS)
def test_grouped_forward_equals_each_plain_model(name, config):
    models = plain_models(name, config, 3)
    grouped = grouped_model(name, [m.state_dict() for m in models], config).eval()
    x = torch.rand(7, 3, 28, 28) * 255
    with torch.no_grad():
        out = grouped(x).view(7, 3, 3)
        for g, model in enumerate(models):
            torch.testing.assert_close(out[:, g], model.eval()(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name, config", MODELS)
def test_fold_state_dict_loads_strict_into_the_plain_model(name, config):
    models = plain_models(name, config, 2)
    grouped = grouped_model(name, [m.state_dict() for m in models], config)
    for g, model in enumerate(models):
        state = member_state(grouped, g)
        assert list(state) == list(model.state_dict())
        fresh = create_model(name, **config)
        fresh.load_state_dict(state, strict=True)
        for key, value in model.state_dict().items():
            assert torch.equal(state[key], value), key


def step_matches_plain_models(grouped, models, x, y, mask, logits, statistics):
    """One masked training step of `grouped` (its `logits` on x) against each plain model run on its own samples
    (mask[:, g]): the same logits and gradients, and with `statistics` the same BatchNorm running statistics."""
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 3), y.repeat_interleave(3), reduction="none").view(-1, 3)
    ((ce * mask).sum(0) / mask.sum(0)).sum().backward()
    for g, model in enumerate(models):
        own = mask[:, g].bool()
        ref = model.train()(x[own])
        torch.testing.assert_close(logits[own, g], ref, rtol=1e-4, atol=1e-4)
        torch.nn.functional.cross_entropy(ref, y[own]).backward()
        grads = unstack({k: p.grad for k, p in grouped.named_parameters()}, g, grouped.member_shapes)
        for key, param in model.named_parameters():
            torch.testing.assert_close(grads[key], param.grad, rtol=1e-3, atol=1e-5 * param.grad.abs().max().item())
        state = member_state(grouped, g) if statistics else {}
        for key, buffer in model.state_dict().items() if statistics else []:   # running statistics after the step
            torch.testing.assert_close(state[key].to(buffer.dtype), buffer, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("negative_gamma", [False, True], ids=["max-pool", "min-pool"])
def test_grouped_ststnet_training_step_matches_plain_models_on_their_own_samples(negative_gamma):
    """Train mode with a per-fold mask: member g's BatchNorm statistics and gradients are those of
    the plain model run on ITS samples only (the held-out samples never enter them). Both stem
    paths: max-pool only (all BN scales positive) and max- and min-pool (one negative)."""
    models = plain_models("ststnet", {}, 3, negative_gamma)
    for model in models:
        model.dropout.p = 0.0
    grouped = grouped_model("ststnet", [m.state_dict() for m in models], {}).train()
    grouped.dropout.p = 0.0
    x, y = torch.rand(12, 3, 28, 28) * 255, torch.randint(0, 3, (12,))
    mask = torch.ones(12, 3)
    mask[0:3, 0] = mask[3:5, 1] = mask[10:, 2] = 0
    step_matches_plain_models(grouped, models, x, y, mask, grouped(x, mask), statistics=True)


@pytest.mark.parametrize("name", ["offapexnet", "dual_inception"])
def test_stacked_training_step_matches_plain_models_on_their_own_samples(name):
    """The vmapped (Stacked) form in train mode: member g's logits and gradients are the plain model's on its own
    samples (no batch statistics, so a member's loss alone decides its gradient)."""
    config = {"hidden": 16, "dropout": 0.0}
    models = plain_models(name, config, 3)
    grouped = grouped_model(name, [m.state_dict() for m in models], config).train()
    x, y = torch.rand(10, 3, 28, 28) * 255, torch.randint(0, 3, (10,))
    mask = torch.ones(10, 3)
    mask[:4, 0] = mask[4:6, 1] = mask[8:, 2] = 0
    step_matches_plain_models(grouped, models, x, y, mask, grouped(x), statistics=False)


def test_dropout_mask_keeps_half_and_scales():
    generator = torch.Generator().manual_seed(0)
    mask = dropout_mask((64, 10, 10), 0.5, generator)
    assert set(mask.unique().tolist()) == {0.0, 2.0} and abs(mask.mean().item() - 1.0) < 0.05
    other = dropout_mask((200, 100), 0.2, generator)
    assert abs((other > 0).float().mean().item() - 0.8) < 0.02 and abs(other.max().item() - 1.25) < 1e-6


def test_groups_keep_a_folds_runs_together_and_size_follows_memory(synth_data, monkeypatch):
    config = LosoConfig.from_dict({**TINY_STSTNET, "engine": "batched"})
    folds = make_folds(synth_data, config)
    members = plan_members(folds, config)
    assert len(members) == 18 and [m.run for m in members[:2]] == ["inner", "main"]
    groups = make_groups(members, 5)   # rounded down to whole folds
    assert [len(g) for g in groups] == [4, 4, 4, 4, 2]
    for group in groups:
        assert all(group[i].fold is group[i + 1].fold for i in range(0, len(group), 2))
    cpu = torch.device("cpu")
    monkeypatch.delenv("HTNET_BATCHED_GROUP", raising=False)
    # from memory: members that fit in half the free memory, capped on a CPU (CPU_GROUP_CAP)
    monkeypatch.setattr("htnet.engine._available_memory", lambda device: 2 * 3 * member_bytes(config) + 1)
    assert resolve_fold_group_size(folds, config, cpu) == 3
    monkeypatch.setattr("htnet.engine._available_memory", lambda device: 10 ** 15)
    assert resolve_fold_group_size(folds, config, cpu) == CPU_GROUP_CAP < 18
    monkeypatch.setattr("htnet.engine._available_memory", lambda device: 1)
    assert resolve_fold_group_size(folds, config, cpu) == 1
    monkeypatch.setenv("HTNET_BATCHED_GROUP", "6")
    assert resolve_fold_group_size(folds, config, cpu) == 6
    monkeypatch.delenv("HTNET_BATCHED_WORKERS", raising=False)
    assert worker_count(cpu, 5, work=10) == 0 and worker_count(torch.device("cuda"), 5) == 0
    # memory for all 18 members in one group; a run that reports to a pruner still gets 3 groups
    monkeypatch.setenv("HTNET_BATCHED_GROUP", "100")
    assert [len(g) for g in plan_groups(folds, config, cpu)] == [18]
    assert [len(g) for g in plan_groups(folds, config, cpu, min_groups=3)] == [6, 6, 6]


@pytest.fixture(scope="module")
def batched_run(synth_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("batched")
    reports = []
    result = run_loso({**TINY_STSTNET, "engine": "batched", "save_weights": True}, synth_data,
                      callback=reports.append, out_dir=out, progress=False)
    return result, reports, out


@pytest.fixture(scope="module")
def plain_runs(synth_data):
    return [run_loso({**TINY_STSTNET, "seed": seed, "engine": "plain"}, synth_data, progress=False)
            for seed in (1, 2)]


def test_batched_engine_matches_plain_within_seed_noise(batched_run, plain_runs):
    batched, _, _ = batched_run
    assert batched.folds_done == batched.folds_total == 9
    for protocol in ("paper", "final", "inner"):
        plain = [r.metrics[f"{protocol}_full_uf1"] for r in plain_runs]
        value = batched.metrics[f"{protocol}_full_uf1"]
        spread = max(plain) - min(plain)
        assert abs(value - plain[0]) <= max(0.1, 1.5 * spread), (protocol, value, plain)
        assert min(plain) - 0.1 <= value <= max(plain) + 0.1, (protocol, value, plain)
        assert abs(batched.metrics[f"{protocol}_full_uar"] - plain_runs[0].metrics[f"{protocol}_full_uar"]) <= 0.15
    assert batched.fold_epochs == plain_runs[0].fold_epochs
    assert list(batched.history.columns) == list(plain_runs[0].history.columns)
    assert len(batched.history) == len(plain_runs[0].history)


def test_batched_protocols_callback_and_paper_at_least_final(batched_run):
    result, reports, out = batched_run
    assert set(result.predictions.protocol) == {"paper", "final", "inner"}
    assert [r["step"] for r in reports] == list(range(1, 10))
    assert "inner_val_uf1" in result.metrics and reports[-1]["fold_epochs"] == result.fold_epochs
    accuracy = per_subject_accuracy(result.predictions).pivot(index="subject", columns="protocol", values="accuracy")
    assert (accuracy["paper"] >= accuracy["final"]).all()
    final = result.predictions[result.predictions.protocol == "final"]
    assert (final.epoch == TINY_STSTNET["epochs"]).all()


def test_batched_weights_are_the_plain_models_and_reproduce_paper_predictions(batched_run, synth_data):
    result, _, out = batched_run
    files = sorted((out / "weights").iterdir())
    assert [f.stem for f in files] == sorted(result.predictions.subject.unique())
    model = create_model("ststnet")
    model.load_state_dict(torch.load(files[0], weights_only=True), strict=True)
    predictions, _ = evaluate_weights(out / "weights", synth_data, {**TINY_STSTNET})
    paper = result.predictions[result.predictions.protocol == "paper"].set_index("sample").prediction
    agree = (predictions.set_index("sample").prediction == paper.loc[predictions["sample"]].values).mean()
    assert agree >= 0.95


def test_a_run_records_its_grouping_and_rerunning_its_config_reproduces_it(batched_run, synth_data):
    result, _, out = batched_run
    # reporting to a callback split the 18 members into groups of 2 (at least 8 groups); rerun without
    # a callback, the saved config must bring back the same groups, hence the same predictions
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["fold_group_size"] == result.config.fold_group_size == 3
    again = run_loso(saved, synth_data, progress=False)
    pd.testing.assert_frame_equal(again.predictions, result.predictions)


def test_batched_engine_is_deterministic_in_process_and_in_workers(synth_data, monkeypatch):
    config = {**TINY_STSTNET, "epochs": 3, "subjects": 4, "protocols": ["paper", "final"], "engine": "batched"}
    monkeypatch.setenv("HTNET_BATCHED_GROUP", "2")
    a = run_loso(config, synth_data, progress=False).predictions
    b = run_loso(config, synth_data, progress=False).predictions
    pd.testing.assert_frame_equal(a, b)
    monkeypatch.setenv("HTNET_BATCHED_WORKERS", "2")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # the workers' thread count: same arithmetic, same predictions
    try:
        single = run_loso(config, synth_data, progress=False).predictions
        monkeypatch.setenv("HTNET_BATCHED_WORKERS", "0")
        in_process = run_loso(config, synth_data, progress=False).predictions
    finally:
        torch.set_num_threads(threads)
    pd.testing.assert_frame_equal(single, in_process)
    assert (a.prediction == single.prediction).mean() >= 0.9


def test_batched_htnet_and_early_stopping_inner_run(synth_data):
    config = {"model": "htnet", "model_config": TINY_HTNET, "epochs": 6, "lr": 3e-3, "batch_size": 32,
              "subjects": 4, "inner_patience": 2, "inner_val_subjects": 2}
    plain = run_loso({**config, "engine": "plain"}, synth_data, progress=False)
    batched = run_loso({**config, "engine": "batched"}, synth_data, progress=False)
    assert set(batched.predictions.protocol) == {"paper", "final", "inner"}
    for protocol in ("paper", "final"):
        assert abs(batched.metrics[f"{protocol}_full_uf1"] - plain.metrics[f"{protocol}_full_uf1"]) <= 0.25
    for result in (plain, batched):  # each inner run stops `patience` evaluations after its best epoch
        inner = result.history[result.history.run == "inner"]
        lengths = inner.groupby("subject").epoch.max()
        best = inner.loc[inner.groupby("subject").val_uf1.idxmax()].set_index("subject").epoch  # earliest max
        assert (lengths == (best + 2).clip(upper=6)).all(), (lengths, best)
        assert result.fold_epochs == 4 * 6 + lengths.sum()
    assert (lengths < 6).any(), "no inner run stopped early: the test would not test early stopping"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")
def test_grouped_models_on_gpu_match_cpu():
    for name, config in MODELS:
        models = plain_models(name, config, 2)
        grouped = grouped_model(name, [m.state_dict() for m in models], config).eval()
        x = torch.rand(5, 3, 28, 28) * 255
        with torch.no_grad():
            cpu = grouped(x).view(5, 2, -1)
            gpu = grouped.cuda()(x.cuda()).cpu().view(5, 2, -1)
        torch.testing.assert_close(gpu, cpu, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("name, model_config", [("htnet", {**TINY_HTNET, "dropout": 0.0}),
                                                ("ststnet", {"dropout": 0.0}),
                                                ("offapexnet", {"hidden": 16, "dropout": 0.0})])
def test_an_early_stopped_inner_run_leaves_its_group_and_the_main_runs_train_on_unchanged(
        name, model_config, synth_data, monkeypatch):
    """Groups of 2 folds (inner + main each): when an inner run stops, the group goes on without it (it cost
    its share of every step until the end, seen on the cpu-study), and the main runs (no dropout: nothing
    shared between members) train exactly as in groups that never held the inner runs."""
    import htnet.engine

    kept = []

    def spy(model, optimizer, keep, *args):
        kept.append(len(keep))
        return keep_members(model, optimizer, keep, *args)

    monkeypatch.setattr(htnet.engine, "keep_members", spy)
    config = {"model": name, "model_config": model_config, "epochs": 8, "lr": 3e-3, "batch_size": 32,
              "subjects": 4, "inner_patience": 1, "inner_val_subjects": 2, "engine": "batched"}
    with_inner = run_loso({**config, "fold_group_size": 4}, synth_data, progress=False)
    mains_only = run_loso({**config, "fold_group_size": 2, "protocols": ["paper", "final"]}, synth_data,
                          progress=False)
    inner = with_inner.history[with_inner.history.run == "inner"]
    assert (inner.groupby("subject").epoch.max() < 8).sum() >= 2 and kept, "no inner run stopped early"
    assert with_inner.fold_epochs == 4 * 8 + len(inner)
    main = with_inner.history[with_inner.history.run == "main"].reset_index(drop=True)
    reference = mains_only.history[mains_only.history.run == "main"].reset_index(drop=True)
    pd.testing.assert_frame_equal(main[["subject", "epoch"]], reference[["subject", "epoch"]])
    torch.testing.assert_close(torch.tensor(main.train_loss.values), torch.tensor(reference.train_loss.values),
                               rtol=1e-4, atol=1e-5)
    assert (main.test_acc.values == reference.test_acc.values).mean() >= 0.95
