"""The fold-batched LOSO engine (`engine="batched"`): the same protocols and outcomes as the plain
engine (htnet.loso), computed several fold-models at a time.

What is batched
---------------
A LOSO run trains, per fold, a `main` model (all subjects but the test subject) and, where the
`inner` protocol is asked for, an `inner` model (also without `inner_val_subjects` validation
subjects). These fold-models (members) all read the same data set and differ only by which samples
they hold out, so a group of G members is trained as ONE computation on ONE batch stream:

- the data set lives on the device as one tensor; an epoch is one pass over the union of the
  members' training samples, in the reference's label-sorted order (`training_order`) or shuffled;
  no DataLoader;
- the grouped model (htnet.models.grouped) evaluates the G members on the shared batch and gives
  (B, G, classes) logits; member g's loss is the mean cross-entropy over ITS OWN training samples in
  the batch (mask (B, G)), the group's loss is the sum over members, so each member's gradient is
  exactly its own; Adam/AdamW/SGD are elementwise, so one optimizer over the stacked weights is G
  independent optimizers;
- BatchNorm (STSTNet) takes each member's batch statistics over its own training samples only
  (the held-out subject never enters them);
- evaluation: every eval epoch, one no-grad pass over the union of the members' test/validation
  samples; each member reads its own rows;
- members start from the plain engine's seeded initial weights (`subject_seed`, `build_model`), and
  protocol selection uses the plain engine's `InnerChoice` / `TestChoice`, so the protocols are the
  same code. What differs from the plain engine: batch boundaries (member g's batch is the shared
  batch minus its held-out samples: a few samples fewer per batch) and dropout's random stream, so
  results agree within seed noise, not bit for bit.

Where it runs
-------------
- CPU: STSTNet uses the fused formulation (three streams = one conv 3->16, one conv 3->16G for the
  group, hand-written backward for the full-resolution part, max-pool before BatchNorm's affine,
  channels-last) and groups are spread over worker processes, one torch thread each (2 processes x
  1 thread beat 1 process x 2 threads for these small, memory-bound ops). glibc's malloc is told to
  keep freed memory (mallopt) so the group's large activations do not page-fault on every step.
- GPU: bf16 autocast, TF32 matmuls, one process; G as large as memory allows.
  `HTNET_COMPILE=default|reduce-overhead|max-autotune` wraps the grouped model in torch.compile
  (reduce-overhead = CUDA graphs); off by default (slower on CPU here, and not measured on a GPU).

Group size (`fold_group_size` in the config, else `group_size`): members per group = min(all
members, what memory allows, a device cap).
Memory per member = 16 bytes per parameter (weights, gradient, two Adam moments) + the activations
a step saves (measured once with saved-tensor hooks on a small batch, scaled to batch_size) x 1.5;
free memory from torch.cuda.mem_get_info on GPU, /proc/meminfo MemAvailable on CPU; half of it is
used. The CPU cap (CPU_GROUP_CAP): on the 2-core CPU, STSTNet's time per fold-epoch falls from 1 to
2 members per group and is flat from 2 to 8 (benchmarks/RESULTS.md, group size);
`HTNET_BATCHED_GROUP=G python -m benchmarks.throughput --models ststnet` measures it on another machine. Environment overrides: HTNET_BATCHED_GROUP (members per group),
HTNET_BATCHED_WORKERS (CPU worker processes; 0 = in process). The grouping shapes each member's
batches and dropout stream, so run_loso records the size it used in the result's config: a rerun
from that config (search rerun --method replica) trains the same groups and reproduces the run.

Trade-offs: a naive torch.func.vmap over the 68 STSTNet folds ran 7x slower than the plain loop on
the 2-core CPU (the issue's measurement); the fused formulation is what pays (benchmarks/RESULTS.md).
Pruning granularity is a group: a stopped run has computed the folds of the groups in flight.
"""
import contextlib
import ctypes
import math
import multiprocessing
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

from htnet.errors import TrainingDiverged, UserError
from htnet.folds import (OPTIMIZERS, FoldOutcome, InnerChoice, TestChoice, build_model, subject_seed,
                         training_order, weights_protocol)
from htnet.models.grouped import GROUPED, grouped_model
from htnet.plain import run_fold

CPU_GROUP_CAP = {"ststnet": 4, "htnet": 4}
GPU_GROUP_CAP = 256


# ------------------------------------------------------------------------------------- the plan

class Member:
    """One fold-model of a group: fold i's `main` or `inner` run."""

    def __init__(self, fold_index, fold, run, train, eval_idx, seed):
        self.fold_index, self.fold, self.run = fold_index, fold, run
        self.train, self.eval_idx, self.seed = train, eval_idx, seed


def plan_members(folds, config):
    members = []
    for i, fold in enumerate(folds):
        if "inner" in config.protocols:
            members.append(Member(i, fold, "inner", fold.inner_train, fold.val,
                                  subject_seed(config.seed, fold.subject, "inner")))
        members.append(Member(i, fold, "main", fold.train, fold.test,
                              subject_seed(config.seed, fold.subject, "main")))
    return members


def make_groups(members, size):
    """Consecutive members, never splitting a fold's inner and main runs across groups."""
    per_fold = 2 if any(m.run == "inner" for m in members) else 1
    size = max(per_fold, size - size % per_fold)
    return [members[i:i + size] for i in range(0, len(members), size)]


def resolve_fold_group_size(folds, config, device, min_groups=1):
    """Members per group: `config.fold_group_size` where set, else as many as memory and the device
    cap allow, small enough for at least `min_groups` groups (see run_folds_batched)."""
    if config.fold_group_size is not None:
        return config.fold_group_size
    total = len(plan_members(folds, config))
    return min(group_size(config, torch.device(device), total), math.ceil(total / max(1, min_groups)))


def plan_groups(folds, config, device, min_groups=1):
    """The groups a run trains (resolve_fold_group_size members each, a fold's runs kept together)."""
    return make_groups(plan_members(folds, config), resolve_fold_group_size(folds, config, device, min_groups))


# ----------------------------------------------------------------------------------- group size

def _available_memory(device):
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def member_bytes(config, probe_batch=8):
    """Memory one member needs: 16 bytes per parameter and the activations a training step saves."""
    model = build_model(config, 0, "cpu").train()
    params = sum(p.numel() for p in model.parameters())
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    x = torch.rand(probe_batch, 3, 28, 28)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x).sum()
    del loss
    activations = sum(saved) * config.batch_size / probe_batch
    return int(16 * params + 1.5 * activations)


def env_int(name, minimum):
    """An integer environment override, or None where unset; anything else is one UserError line."""
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    if not text.isascii() or not text.isdigit() or int(text) < minimum:
        raise UserError(f"environment variable {name}={text!r} must be an integer >= {minimum}")
    return int(text)


def group_size(config, device, members_total):
    """Members per group: all of them where memory allows, capped on CPU (see the docstring)."""
    override = env_int("HTNET_BATCHED_GROUP", 1)
    if override:
        return min(override, members_total)
    per_member = member_bytes(config)
    by_memory = max(1, int(0.5 * _available_memory(device) // per_member))
    cap = GPU_GROUP_CAP if device.type == "cuda" else CPU_GROUP_CAP.get(config.model, 4)
    return max(1, min(members_total, by_memory, cap))


# Below this many sample-member-epochs (about a minute of one core's STSTNet work) the worker
# processes' start-up (a few seconds each) is not worth it.
MIN_WORK_FOR_WORKERS = 500_000


def worker_count(device, groups, work=math.inf):
    """CPU worker processes (1 torch thread each): as many as this process's torch threads."""
    override = env_int("HTNET_BATCHED_WORKERS", 0)
    if override is not None:
        return min(override, groups)
    if device.type != "cpu" or groups < 2 or work < MIN_WORK_FOR_WORKERS:
        return 0
    threads = torch.get_num_threads()
    return min(threads, groups) if threads > 1 else 0


# ------------------------------------------------------------------------------------ CPU tuning

_MALLOC_TUNED = False


def tune_malloc():
    """Keep freed memory in glibc's heap (no mmap/munmap per large tensor): on this CPU a fresh
    60 MB activation costs more in page faults than the arithmetic on it."""
    global _MALLOC_TUNED
    if _MALLOC_TUNED or not sys.platform.startswith("linux"):
        return
    _MALLOC_TUNED = True
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)   # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 30)   # M_TRIM_THRESHOLD


def _gpu_setup(device):
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def _autocast(device, model_name):
    """bf16 autocast on a GPU for HTNet (matmul-bound); STSTNet stays float32 (memory-bound, and its
    BatchNorm statistics are sums over 230k values per channel)."""
    if device.type == "cuda" and model_name != "ststnet" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _maybe_compile(model, device):
    mode = os.environ.get("HTNET_COMPILE", "").strip()
    if not mode or mode == "0":
        return model
    return torch.compile(model, mode=None if mode in ("1", "default") else mode, dynamic=False)


# ------------------------------------------------------------------------------- training a group

def train_group(members, X, y, data, config, device, progress=False):
    """Train one group of members; return {member index in group: (history, epochs, choice, weights)}."""
    G = len(members)
    states = [build_model(config, m.seed, "cpu").state_dict() for m in members]
    model = grouped_model(config.model, states, config.model_config).to(device)
    generator_seed = subject_seed(config.seed, "+".join(f"{m.fold.subject}/{m.run}" for m in members), "batched")
    torch.manual_seed(generator_seed)  # dropout inside the grouped model draws from the global stream
    generator = torch.Generator(device=device).manual_seed(generator_seed)
    if hasattr(model, "random_generator"):
        model.random_generator = generator
    optimizer_cls = OPTIMIZERS[config.optimizer]
    kwargs = {"lr": config.lr, "weight_decay": config.weight_decay}
    if device.type == "cpu" and config.optimizer in ("adam", "adamw"):
        kwargs["fused"] = True
    optimizer = optimizer_cls(model.parameters(), **kwargs)
    forward = _maybe_compile(model, device)

    n = len(data.labels)
    train_mask = np.zeros((n, G), dtype=np.float32)
    for g, m in enumerate(members):
        train_mask[m.train, g] = 1.0
    union = np.flatnonzero(train_mask.any(1))
    order = training_order(union, data.labels, data.samples)
    mask_all = torch.as_tensor(train_mask, device=device)
    eval_union = np.unique(np.concatenate([m.eval_idx for m in members]))
    eval_rows = [np.searchsorted(eval_union, m.eval_idx) for m in members]
    eval_x = X[torch.as_tensor(eval_union, device=device)]
    order_t = torch.as_tensor(order, device=device)
    if not config.shuffle:
        x_ordered, y_ordered, m_ordered = X[order_t], y[order_t], mask_all[order_t]
    prepare = getattr(model, "prepare_input", lambda t: t)

    choices = []
    for m in members:
        if m.run == "inner":
            choices.append(InnerChoice(data.labels[m.eval_idx], config.inner_patience))
        else:
            choices.append(TestChoice(data.labels[m.eval_idx]))
    history = [[] for _ in members]
    epochs_done = [0] * G
    weights = [None] * G
    active = np.ones(G, dtype=bool)
    active_t = torch.ones(G, device=device)
    keep_weights = weights_protocol(config)
    sample_counts = mask_all[torch.as_tensor(union, device=device)].sum(0).clamp(min=1)

    for epoch in range(1, config.epochs + 1):
        model.train()
        if config.shuffle:
            perm = order_t[torch.randperm(len(order_t), generator=torch.Generator().manual_seed(
                generator_seed + epoch)).to(device)]
            x_ordered, y_ordered, m_ordered = X[perm], y[perm], mask_all[perm]
        loss_sum = torch.zeros(G, device=device)
        for start in range(0, len(order), config.batch_size):
            xb = prepare(x_ordered[start:start + config.batch_size])
            yb = y_ordered[start:start + config.batch_size]
            mb = m_ordered[start:start + config.batch_size] * active_t
            with _autocast(device, config.model):
                logits = forward(xb, mb)
            B = logits.shape[0]
            ce = F.cross_entropy(logits.float().reshape(B * G, -1), yb[:, None].expand(B, G).reshape(-1),
                                 reduction="none").view(B, G)
            count = mb.sum(0)
            per_member = (ce * mb).sum(0) / count.clamp(min=1)
            optimizer.zero_grad(set_to_none=True)
            per_member.sum().backward()
            optimizer.step()
            loss_sum += per_member.detach() * count
        if epoch % config.eval_every and epoch != config.epochs:
            continue
        mean_loss = (loss_sum / sample_counts).cpu().numpy()
        if not np.isfinite(mean_loss[active]).all():
            bad = float(mean_loss[active][~np.isfinite(mean_loss[active])][0])
            raise TrainingDiverged(f"training loss is {bad} at epoch {epoch} (lr {config.lr} too high?)")
        model.eval()
        with torch.no_grad(), _autocast(device, config.model):
            predicted = torch.cat([forward(prepare(eval_x[s:s + config.batch_size])).float().argmax(-1)
                                   for s in range(0, len(eval_union), config.batch_size)]).cpu().numpy()
        for g, m in enumerate(members):
            if not active[g]:
                continue
            preds = predicted[eval_rows[g], g]
            if m.run == "inner":
                history[g].append(("inner", epoch, float(mean_loss[g]), np.nan, choices[g].add(epoch, preds)))
                epochs_done[g] = epoch
                if choices[g].done:
                    active[g] = False
                    active_t[g] = 0.0
            else:
                acc, is_paper_best = choices[g].add(epoch, preds)
                history[g].append(("main", epoch, float(mean_loss[g]), acc, np.nan))
                epochs_done[g] = epoch
                if config.save_weights and (is_paper_best if keep_weights == "paper" else epoch == config.epochs):
                    weights[g] = model.fold_state_dict(g)
        if not active.any():
            break
    return [(history[g], epochs_done[g], choices[g], weights[g]) for g in range(G)]


def _outcomes(group, results, config):
    """FoldOutcome per fold of the group, in fold order."""
    by_fold = {}
    for m, result in zip(group, results):
        by_fold.setdefault(m.fold_index, {})[m.run] = (m, result)
    outcomes = []
    for fold_index in sorted(by_fold):
        runs = by_fold[fold_index]
        main_member, (main_history, _, test, weights) = runs["main"]
        inner = runs.get("inner")
        history, fold_epochs, inner_choice = [], 0, None
        if inner is not None:
            _, (inner_history, inner_epochs, inner_choice, _) = inner
            history += inner_history
            fold_epochs += inner_epochs
        history += main_history
        fold_epochs += config.epochs
        chosen = test.chosen(config.protocols, inner_choice.epoch if inner_choice else None)
        fold = main_member.fold
        outcomes.append(FoldOutcome(fold.subject, fold.test, chosen,
                                    inner_choice.labels if inner_choice else None,
                                    inner_choice.predictions if inner_choice else None,
                                    history, fold_epochs, weights))
    return outcomes


# -------------------------------------------------------------------------------- worker processes

_WORKER = {}


def _worker_init(X, y, data, config):
    torch.set_num_threads(1)
    tune_malloc()
    _WORKER.update(X=torch.from_numpy(X), y=torch.from_numpy(y), data=data, config=config)


def _worker_run(group_folds, group_members):
    w = _WORKER
    members = [Member(i, fold, run, train, eval_idx, seed)
               for (i, fold), (run, train, eval_idx, seed) in zip(group_folds, group_members)]
    results = train_group(members, w["X"], w["y"], w["data"], w["config"], torch.device("cpu"))
    return _outcomes(members, results, w["config"])


def run_folds_batched(folds, X, y, data, config, device, progress=False, min_groups=1):
    """Yield a FoldOutcome per fold, in fold order, as `htnet.plain.run_folds_plain` does.
    `min_groups`: split the folds into at least this many groups, so that a run whose intermediate
    results may stop it (a search's pruner) reports that often (on a GPU, one group could hold all)."""
    if config.model not in GROUPED:
        for fold in folds:
            yield run_fold(fold, X, y, data, config, device, progress=progress)
        return
    device = torch.device(device)
    _gpu_setup(device)
    if device.type == "cpu":
        tune_malloc()
    groups = plan_groups(folds, config, device, min_groups)
    workers = worker_count(device, len(groups), sum(map(len, groups)) * config.epochs * len(data.labels))
    if workers == 0:
        for group in groups:
            yield from _outcomes(group, train_group(group, X, y, data, config, device, progress), config)
        return
    context = multiprocessing.get_context("spawn")
    pool = context.Pool(workers, initializer=_worker_init,
                        initargs=(X.cpu().numpy(), y.cpu().numpy(), data, config))
    try:
        pending = [pool.apply_async(_worker_run, ([(m.fold_index, m.fold) for m in group],
                                                  [(m.run, m.train, m.eval_idx, m.seed) for m in group]))
                   for group in groups]
        for job in pending:
            yield from job.get()
        pool.close()
    finally:
        pool.terminate()
        pool.join()
