"""The LOSO training loop: fold-models (a fold's `main` and `inner` runs) trained G at a time as one computation
(train_group; G = 1 is the reference recipe, bit for bit), in groups memory allows, in process or in CPU workers."""
import contextlib
import ctypes
import dataclasses
import functools
import math
import multiprocessing
import os

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from htnet.errors import TrainingDiverged, UserError
from htnet.folds import (OPTIMIZERS, Fold, FoldOutcome, InnerChoice, TestChoice, build_model, subject_seed,
                         training_order)
from htnet.models.grouped import GROUPED, grouped_model, keep_members, member_state

CPU_GROUP_CAP = 4   # STSTNet's time per fold-epoch is flat from 2 to 8 (RESULTS.md)
GPU_GROUP_CAP = 256
# Below this many sample-member-epochs (about a minute of one core's STSTNet work) the worker
# processes' start-up (a few seconds each) is not worth it.
MIN_WORK_FOR_WORKERS = 500_000


@dataclasses.dataclass
class Member:
    """One fold-model: fold `fold_index`'s `main` or `inner` run."""
    fold_index: int
    fold: Fold
    run: str
    train: np.ndarray
    eval_idx: np.ndarray
    seed: int


def plan_members(folds, config):
    members = []
    for i, fold in enumerate(folds):
        if "inner" in config.protocols:
            members.append(Member(i, fold, "inner", fold.inner_train, fold.val,
                                  subject_seed(config.seed, fold.subject, "inner")))
        members.append(Member(i, fold, "main", fold.train, fold.test, subject_seed(config.seed, fold.subject, "main")))
    return members


def make_groups(members, size):
    """Consecutive members, never splitting a fold's inner and main runs across groups."""
    per_fold = 2 if any(m.run == "inner" for m in members) else 1
    size = max(per_fold, size - size % per_fold)
    return [members[i:i + size] for i in range(0, len(members), size)]


def resolve_fold_group_size(folds, config, device, min_groups=1):
    """Members per group: `config.fold_group_size` where set, else HTNET_BATCHED_GROUP, else all that half the
    free memory allows (capped), few enough for at least `min_groups` groups (reports for a listening pruner)."""
    if config.fold_group_size is not None:
        return config.fold_group_size
    total, device = len(plan_members(folds, config)), torch.device(device)
    size = env_int("HTNET_BATCHED_GROUP", 1)
    if size is None:
        by_memory = int(0.5 * _available_memory(device) // member_bytes(config))
        size = max(1, min(by_memory, GPU_GROUP_CAP if device.type == "cuda" else CPU_GROUP_CAP))
    return min(size, total, math.ceil(total / max(1, min_groups)))


def plan_groups(folds, config, device, min_groups=1):
    """The groups a run trains: one member each for the plain engine, else resolve_fold_group_size's."""
    members = plan_members(folds, config)
    if config.engine == "plain" or config.model not in GROUPED:
        return [[m] for m in members]
    return make_groups(members, resolve_fold_group_size(folds, config, device, min_groups))


def _available_memory(device):
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with contextlib.suppress(OSError, StopIteration), open("/proc/meminfo") as f:
        return int(next(line for line in f if line.startswith("MemAvailable:")).split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def member_bytes(config, probe_batch=8):
    """Memory one member needs: 16 bytes per parameter (weights, gradient, two Adam moments) and 1.5 x the
    activations a training step saves (measured on a small batch)."""
    model = build_model(config, 0, "cpu").train()
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.rand(probe_batch, 3, 28, 28)).sum()
    activations = sum(saved) * config.batch_size / probe_batch
    return int(16 * sum(p.numel() for p in model.parameters()) + 1.5 * activations)


def env_int(name, minimum):
    """An integer environment override, or None where unset; anything else is one UserError line."""
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    if not text.isascii() or not text.isdigit() or int(text) < minimum:
        raise UserError(f"environment variable {name}={text!r} must be an integer >= {minimum}")
    return int(text)


def worker_count(device, groups, work=math.inf):
    """CPU worker processes of one torch thread each (2 x 1 beat 1 x 2 threads for these small,
    memory-bound ops): as many as this process's threads; HTNET_BATCHED_WORKERS overrides (0: none)."""
    override = env_int("HTNET_BATCHED_WORKERS", 0)
    if override is not None:
        return min(override, groups)
    if device.type != "cpu" or groups < 2 or work < MIN_WORK_FOR_WORKERS:
        return 0
    threads = torch.get_num_threads()
    return min(threads, groups) if threads > 1 else 0


@functools.cache
def tune_malloc():
    """Keep freed memory in glibc's heap (no mmap/munmap per large tensor): on this CPU a fresh
    60 MB activation costs more in page faults than the arithmetic on it. (No glibc: OSError, nothing done.)"""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)   # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 30)   # M_TRIM_THRESHOLD


def _start(members, config, device):
    """(model, optimizer, shuffle seed) of a group. G = 1: the reference recipe (plain model and optimizer,
    float32, dropout continuing the seeded init's global stream). G > 1: the grouped model from the members'
    seeded starts, its own dropout stream, fused Adam on a CPU, TF32 on a GPU."""
    kwargs = {"lr": config.lr, "weight_decay": config.weight_decay}
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = len(members) > 1
        torch.backends.cudnn.benchmark = len(members) > 1
    if len(members) == 1:
        model = build_model(config, members[0].seed, device)
        model.member_shapes = {k: v.shape for k, v in model.state_dict().items()}
        return model, OPTIMIZERS[config.optimizer](model.parameters(), **kwargs), members[0].seed
    states = [build_model(config, m.seed, "cpu").state_dict() for m in members]
    model = grouped_model(config.model, states, config.model_config).to(device)
    names = "+".join(f"{m.fold.subject}/{m.run}" for m in members)
    seed = subject_seed(config.seed, names, "batched")
    torch.manual_seed(seed)   # dropout in the grouped HTNet draws from the global stream
    if hasattr(model, "random_generator"):
        model.random_generator = torch.Generator(device=device).manual_seed(seed)
    if device.type == "cpu" and config.optimizer in ("adam", "adamw"):
        kwargs["fused"] = True
    optimizer = OPTIMIZERS[config.optimizer](model.parameters(), **kwargs)
    return model, optimizer, subject_seed(config.seed, names, "shuffle")


def train_group(members, X, y, data, config, device, progress=False):
    """Train G members on one batch stream: each epoch is one pass over the union of their training
    samples (label-sorted, or shuffled); member g's loss is the mean cross-entropy over its own samples
    in the batch, so its gradient is its own. Returns, per member, (history, epochs, choice, weights)."""
    G, device = len(members), torch.device(device)
    model, optimizer, shuffle_seed = _start(members, config, device)
    # config.bf16: bf16 on a GPU for grouped HTNet (matmul-bound); STSTNet stays float32 (memory-bound, and its
    # BatchNorm statistics are sums over 230k values per channel)
    bf16 = (G > 1 and device.type == "cuda" and config.model != "ststnet" and config.bf16
            and torch.cuda.is_bf16_supported())
    autocast = functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext
    mode = config.compile  # "" (off), default, reduce-overhead, max-autotune, or eager (Dynamo only: a quick check)

    def compiled(model):
        return model if G == 1 or not mode else torch.compile(model, backend="eager") if mode == "eager" \
            else torch.compile(model, mode=None if mode == "default" else mode, dynamic=False)

    forward = compiled(model)
    mask = np.zeros((len(data.labels), G), dtype=np.float32)
    for g, m in enumerate(members):
        mask[m.train, g] = 1.0
    order = torch.as_tensor(training_order(np.flatnonzero(mask.any(1)), data.labels, data.samples), device=device)
    counts = mask.sum(0).astype(np.float64)
    mask = torch.as_tensor(mask, device=device)
    eval_union = np.unique(np.concatenate([m.eval_idx for m in members]))
    eval_rows = [np.searchsorted(eval_union, m.eval_idx) for m in members]
    eval_x = X[torch.as_tensor(eval_union, device=device)]
    eval_chunk = len(eval_union) if G == 1 else config.batch_size   # the reference tests in one pass
    choices = [InnerChoice(data.labels[m.eval_idx], config.inner_patience) if m.run == "inner"
               else TestChoice(data.labels[m.eval_idx]) for m in members]
    history, epochs_done, weights = [[] for _ in members], [0] * G, [None] * G
    alive, columns = np.ones(G, dtype=bool), list(range(G))   # the model's column j is member columns[j]
    generator = torch.Generator().manual_seed(shuffle_seed)
    desc = "+".join(m.fold.subject + (" inner" if m.run == "inner" else "") for m in members)
    for epoch in tqdm(range(1, config.epochs + 1), desc=desc, leave=False, disable=not progress):
        model.train()
        if config.shuffle:
            order = order[torch.randperm(len(order), generator=generator).to(device)]
        loss_sum = torch.zeros(len(columns), device=device)
        for start in range(0, len(order), config.batch_size):
            batch = order[start:start + config.batch_size]
            yb, mb = y[batch], mask[batch]
            with autocast():
                logits = forward(X[batch], mb) if getattr(model, "takes_mask", False) else forward(X[batch])
            logits = logits.float().view(len(batch), len(columns), -1)
            if G == 1:   # the reference's loss: the batch mean
                losses, count = F.cross_entropy(logits[:, 0], yb)[None], len(batch)
            else:
                ce = F.cross_entropy(logits.flatten(0, 1), yb.repeat_interleave(len(columns)),
                                     reduction="none").view(-1, len(columns))
                count = mb.sum(0)
                losses = (ce * mb).sum(0) / count.clamp(min=1)
            optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()
            optimizer.step()
            loss_sum += losses.detach() * count
        if epoch % config.eval_every and epoch != config.epochs:
            continue
        mean_loss = loss_sum.cpu().double().numpy() / np.maximum(counts, 1)
        if not np.isfinite(mean_loss).all():
            bad = mean_loss[~np.isfinite(mean_loss)][0]
            raise TrainingDiverged(f"training loss is {bad} at epoch {epoch} (lr {config.lr} too high?)")
        model.eval()
        with torch.no_grad(), autocast():
            predicted = torch.cat([forward(eval_x[s:s + eval_chunk]).float().view(-1, len(columns), logits.shape[-1])
                                   .argmax(-1)
                                   for s in range(0, len(eval_union), eval_chunk)]).cpu().numpy()
        for j, g in enumerate(columns):
            m, epochs_done[g] = members[g], epoch
            if m.run == "inner":
                history[g].append(("inner", epoch, float(mean_loss[j]), np.nan,
                                   choices[g].add(epoch, predicted[eval_rows[g], j])))
                alive[g] = not choices[g].done
            else:
                acc, is_paper_best = choices[g].add(epoch, predicted[eval_rows[g], j])
                history[g].append(("main", epoch, float(mean_loss[j]), acc, np.nan))
                # the paper protocol's epoch (as the reference's `--train True`) when it is run, else the last
                if config.save_weights and (is_paper_best if "paper" in config.protocols else epoch == config.epochs):
                    weights[g] = member_state(model, j)
        if not alive.any():
            break
        if not alive[columns].all():   # early-stopped inner runs leave the group: the others train on as they were
            keep = [j for j, g in enumerate(columns) if alive[g]]
            model, optimizer = keep_members(model, optimizer, keep, config.model, config.model_config)
            forward, mask, counts = compiled(model), mask[:, keep], counts[keep]
            columns = [columns[j] for j in keep]
    return list(zip(history, epochs_done, choices, weights))


def _fold_outcome(fold, runs, config):
    """A fold's FoldOutcome from its runs' train_group results ({"main": ..., "inner": ...})."""
    history, _, test, weights = runs["main"]
    inner_history, inner_epochs, inner, _ = runs.get("inner", ([], 0, None, None))
    # both runs evaluate at the same epochs, so E* is always one of the main run's
    chosen = test.chosen(config.protocols, inner.epoch if inner else None)
    return FoldOutcome(fold.subject, fold.test, chosen, inner, inner_history + history, config.epochs + inner_epochs,
                       weights)


_WORKER = {}


def _worker_init(X, y, data, config):
    torch.set_num_threads(1)
    tune_malloc()
    _WORKER.update(X=torch.from_numpy(X), y=torch.from_numpy(y), data=data, config=config)


def _worker_run(members):
    return train_group(members, _WORKER["X"], _WORKER["y"], _WORKER["data"], _WORKER["config"], "cpu")


def _trained(groups, X, y, data, config, device, progress):
    """(group, train_group results) per group, in order: in process, or in spawned CPU workers."""
    workers = 0
    if config.engine == "batched":
        workers = worker_count(device, len(groups), sum(map(len, groups)) * config.epochs * len(data.labels))
    if workers == 0:
        for group in groups:
            yield group, train_group(group, X, y, data, config, device, progress)
        return
    pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_worker_init,
                                                     initargs=(X.cpu().numpy(), y.cpu().numpy(), data, config))
    try:
        yield from zip(groups, pool.imap(_worker_run, groups))
        pool.close()
    finally:
        pool.terminate()
        pool.join()


def run_folds(folds, X, y, data, config, device, progress=False, min_groups=1, finished=None):
    """A FoldOutcome per fold, in fold order; `min_groups` as in resolve_fold_group_size. `finished`: {fold
    index: FoldOutcome} of an earlier attempt (htnet.checkpoint.load_folds), yielded as they are where their
    whole group is done; a group done in part trains again whole (its batch stream is shared), giving the
    same outcomes."""
    device, finished = torch.device(device), finished or {}
    if device.type == "cpu":
        tune_malloc()
    per_fold = 2 if "inner" in config.protocols else 1
    groups = plan_groups(folds, config, device, min_groups)
    to_train = [g for g in groups if not all(m.fold_index in finished for m in g)]
    retrained = {m.fold_index for g in to_train for m in g}
    runs, done = {}, 0

    def ready():
        nonlocal done
        while done < len(folds) and (done in finished and done not in retrained
                                     or len(runs.get(done, ())) == per_fold):
            outcome = _fold_outcome(folds[done], runs.pop(done), config) if done in runs else finished[done]
            done += 1
            yield outcome

    yield from ready()
    for group, results in _trained(to_train, X, y, data, config, device, progress):
        for member, result in zip(group, results):
            runs.setdefault(member.fold_index, {})[member.run] = result
        yield from ready()


def run_fold(fold, X, y, data, config, device, progress=False):
    """One fold's FoldOutcome, trained by the reference recipe (the plain engine)."""
    return next(run_folds([fold], X, y, data, dataclasses.replace(config, engine="plain"), device, progress))
