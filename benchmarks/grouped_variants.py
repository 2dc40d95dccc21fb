"""Which way of training G fold-models at once is fastest: one training step (forward, masked
cross-entropy, backward, fused Adam) of a group of G fold-models on one shared batch, for

- HTNet: HTNet(groups=G) (htnet.models.htnet) vs `torch.func.stack_module_state` + `functional_call`
  + `vmap` over G plain HTNets (dropout drawn per member, randomness="different"), and, with
  `--other-grouped FILE`, the `grouped_model` of another grouped-models module (e.g. an older
  htnet/models/grouped.py from `git show`) side by side;
- STSTNet: `GroupedSTSTNet` eager and under `torch.compile`. (vmap is not a
  candidate for STSTNet: each member's BatchNorm must leave its held-out subject out of the batch
  statistics, which the grouped model's mask does and a vmapped plain BatchNorm cannot.)

All variants run in ONE process, interleaved round by round, medians over rounds: only same-run
ratios mean anything on a shared machine.

    python -m benchmarks.grouped_variants [--groups 4] [--batch 256] [--rounds 5] [--steps 5]
        [--models htnet-small,htnet-medium,ststnet] [--threads N] [--no-compile] [--other-grouped FILE]
        [--json FILE]
"""
import argparse
import copy
import importlib.util
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from htnet.models import create_model
from htnet.models import grouped
from htnet.models.htnet import HTNet

MODELS = {
    "htnet-small": ("htnet", {"dim": 32, "heads": 2, "block_repeats": [1, 1, 2]}),
    "htnet-medium": ("htnet", {"dim": 64, "heads": 2, "block_repeats": [2, 2, 4]}),
    "htnet-paper": ("htnet", {}),
    "ststnet": ("ststnet", {}),
}


def masked_loss(logits, y, mask):
    B, G = mask.shape
    ce = F.cross_entropy(logits.reshape(B * G, -1), y[:, None].expand(B, G).reshape(-1),
                         reduction="none").view(B, G)
    return ((ce * mask).sum(0) / mask.sum(0).clamp(min=1)).sum()


def grouped_step(name, config, states, module=grouped):
    model = module.grouped_model(name, states, config)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)

    def step(x, y, mask):
        logits = model(x) if isinstance(model, HTNet) else model(x, mask)   # only STSTNet mixes samples
        loss = masked_loss(logits.reshape(*mask.shape, -1), y, mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step, model


def vmap_step(name, config, states):
    plain = [create_model(name, **config) for _ in states]
    for m, s in zip(plain, states):
        m.load_state_dict(s)
        m.train()
    params, buffers = torch.func.stack_module_state(plain)
    params = {k: v.detach().requires_grad_() for k, v in params.items()}
    base = copy.deepcopy(plain[0]).to("meta")

    def one(p, b, x):
        return torch.func.functional_call(base, (p, b), (x,))
    batched = torch.vmap(one, in_dims=(0, 0, None), randomness="different")
    optimizer = torch.optim.Adam(params.values(), lr=1e-4, fused=True)

    def step(x, y, mask):
        logits = batched(params, buffers, x).transpose(0, 1)  # (G, B, C) -> (B, G, C)
        loss = masked_loss(logits, y, mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def load_module(path):
    spec = importlib.util.spec_from_file_location("other_grouped", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def variants(model_key, groups, compile_, other=None):
    name, config = MODELS[model_key]
    torch.manual_seed(0)
    states = [create_model(name, **config).state_dict() for _ in range(groups)]
    out = {}
    if name == "htnet":
        out["HTNet(groups=G)"] = grouped_step(name, config, states)[0]
        if other is not None:
            out["other grouped_model (--other-grouped)"] = grouped_step(name, config, states, other)[0]
        out["vmap(functional_call)"] = vmap_step(name, config, states)
        return out
    out["GroupedSTSTNet"] = grouped_step(name, config, states)[0]
    if compile_:
        step, model = grouped_step(name, config, states)
        model.forward = torch.compile(model.forward, dynamic=False)
        out["GroupedSTSTNet, torch.compile"] = step
    return out


def measure(steps_by_name, x, y, mask, rounds, steps):
    for step in steps_by_name.values():  # warm-up: compilation, allocator
        for _ in range(2):
            step(x, y, mask)
    times = {k: [] for k in steps_by_name}
    for _ in range(rounds):
        for key, step in steps_by_name.items():
            start = time.perf_counter()
            for _ in range(steps):
                step(x, y, mask)
            times[key].append((time.perf_counter() - start) / steps)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="htnet-small,htnet-medium,ststnet")
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, help="torch threads (the batched engine's STSTNet workers use 1)")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--other-grouped", help="a grouped-models .py file whose grouped_model(name, states, "
                   "config) joins the HTNet comparison")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, 3, 28, 28, generator=g) * 255
    y = torch.randint(0, 3, (args.batch,), generator=g)
    mask = (torch.rand(args.batch, args.groups, generator=g) > 0.05).float()
    print(f"{platform.node()}: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"G={args.groups}, batch {args.batch}, {args.rounds} rounds x {args.steps} steps")
    report = {}
    for key in args.models.split(","):
        other = load_module(args.other_grouped) if args.other_grouped else None
        result = measure(variants(key, args.groups, not args.no_compile, other), x, y, mask, args.rounds, args.steps)
        fastest = min(result.values())
        report[key] = result
        print(f"\n{key}: ms per training step of {args.groups} fold-models")
        for name, seconds in result.items():
            print(f"  {name:45s} {seconds * 1000:9.1f} ms   {seconds / fastest:5.2f}x the fastest")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
