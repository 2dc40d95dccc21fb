"""G fold-models as one computation (HTNet(groups=G), GroupedSTSTNet, Stacked for models without batch statistics):
`grouped_model` starts one from G plain state_dicts, `member_state(model, g)` gives member g's back, strict-loadable."""
import math

import torch
import torch.nn.functional as F

from htnet.models.dual_inception import DualInception
from htnet.models.htnet import HTNet
from htnet.models.offapexnet import OFFApexNet
from htnet.models.ststnet import STSTNet


def _group_dim(grouped, member):
    """Where the members sit in a grouped tensor: None = stacked on a new dim 0, else the dim concatenated along."""
    if len(grouped) > len(member):
        return None
    return next((d for d, (a, b) in enumerate(zip(grouped, member)) if a != b), 0)


def grouped_model(name, states, config):
    with torch.device("meta"):
        model = GROUPED[name](len(states), config)
    model.load_state_dict({key: stack(tensor.shape, [s[key] for s in states])
                           for key, tensor in model.state_dict().items()}, assign=True)
    model.member_shapes = {k: v.shape for k, v in states[0].items()}
    return model


def stack(grouped_shape, members):
    """Member tensors as the grouped model holds them (the inverse of unstack)."""
    dim = _group_dim(grouped_shape, members[0].shape)
    return torch.stack(members) if dim is None else torch.cat(members, dim)


def unstack(tensors, g, shapes):
    """Member g's part of each grouped tensor (a state_dict, gradients)."""
    out = {}
    for key, tensor in tensors.items():
        dim, size = _group_dim(tensor.shape, shapes[key]), shapes[key]
        if tensor.shape == size:   # G = 1
            out[key] = tensor
        else:
            out[key] = tensor[g] if dim is None else tensor.narrow(dim, g * size[dim], size[dim])
    return out


def stack_members(model, groups):
    """Each parameter and buffer of `model` replaced by an empty one with a new dim 0 of `groups` members."""
    for module in model.modules():
        for name, tensor in list(module.named_parameters(recurse=False)):
            setattr(module, name, torch.nn.Parameter(tensor.new_empty(groups, *tensor.shape)))
        for name, tensor in list(module.named_buffers(recurse=False)):
            module.register_buffer(name, tensor.new_empty(groups, *tensor.shape))


def member_state(model, g):
    """Member g's weights as the plain model's state_dict (on the CPU)."""
    return {k: v.detach().cpu().clone() for k, v in unstack(model.state_dict(), g, model.member_shapes).items()}


def keep_members(model, optimizer, keep, name, config):
    """The grouped model and optimizer of members `keep` only, their weights and optimizer state as they were:
    a member that is done (an early-stopped inner run) stops costing its share of every step."""
    shapes, old = model.member_shapes, dict(model.named_parameters())
    kept = grouped_model(name, [member_state(model, g) for g in keep], config).to(next(model.parameters()).device)
    if getattr(model, "random_generator", None) is not None:
        kept.random_generator = model.random_generator
    kept_optimizer = type(optimizer)(kept.parameters(), **optimizer.defaults)
    for key, param in kept.named_parameters():
        kept_optimizer.state[param] = {
            k: stack(param.shape, [unstack({key: v}, g, shapes)[key] for g in keep])
            if torch.is_tensor(v) and v.shape == old[key].shape else v
            for k, v in optimizer.state.get(old[key], {}).items()}
    return kept, kept_optimizer


def dropout_mask(shape, p, generator=None, device=None):
    """Dropout's keep-mask, already scaled by 1 / (1 - p). For p = 0.5 it uses one random bit per
    element (32 per draw): on the CPU torch.rand / bernoulli_ cost more than the layer they feed."""
    if p == 0.5:
        n = math.prod(shape)
        words = torch.randint(0, 2 ** 32, ((n + 31) // 32, 1), generator=generator, device=device)
        bits = (words >> torch.arange(32, device=device)) & 1
        return bits.reshape(-1)[:n].reshape(shape).to(torch.float32).mul_(2.0)
    keep = torch.rand(shape, generator=generator, device=device) >= p
    return keep.to(torch.float32).mul_(1.0 / (1.0 - p))


def _conv_backward(dz, x, weight):
    _, dw, db = torch.ops.aten.convolution_backward(
        dz, x, weight, [weight.shape[0]], [1, 1], [2, 2], [1, 1], False, [0, 0], 1, [False, True, True])
    return None, dw, db, None


class _StemFn(torch.autograd.Function):
    """z = relu(conv2d(x, w, b, padding=2)); returns per-sample channel sums of z and z^2 and the
    3x3/stride-3 max-pool of z (plus the min-pool when asked). x needs no gradient (the data)."""

    @staticmethod
    def forward(ctx, x, weight, bias, need_min):
        z = F.conv2d(x, weight, bias, padding=2).relu_()
        s1, s2 = z.sum((2, 3)), torch.mul(z, z).sum((2, 3))
        pmax, idx_max = F.max_pool2d(z, 3, 3, 1, return_indices=True)
        pmin, idx_min = pmax.new_zeros(0), idx_max.new_zeros(0)
        if need_min:
            pmin, idx_min = F.max_pool2d(z.neg(), 3, 3, 1, return_indices=True)
            pmin = pmin.neg_()
        ctx.save_for_backward(x, weight, z, idx_max, idx_min)
        ctx.need_min = need_min
        return s1, s2, pmax, pmin

    @staticmethod
    def backward(ctx, ds1, ds2, dpmax, dpmin):
        x, weight, z, idx_max, idx_min = ctx.saved_tensors
        ds1 = z.new_zeros(z.shape[:2]) if ds1 is None else ds1
        ds2 = z.new_zeros(z.shape[:2]) if ds2 is None else ds2
        # the max-pool's gradient lands on the argmax positions; then d/dz of s1, s2 (ds1 + 2 z ds2) in place
        layout = torch.channels_last if z.dim() == 4 and not z.is_contiguous() and \
            z.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        dz = torch.ops.aten.max_pool2d_with_indices_backward(
            dpmax.to(z.dtype).contiguous(memory_format=layout), z, [3, 3], [3, 3], [1, 1], [1, 1], False, idx_max)
        if ctx.need_min and dpmin is not None and dpmin.numel():
            dz.flatten(2).scatter_add_(2, idx_min.flatten(2), dpmin.flatten(2).to(dz.dtype))
        dz.addcmul_(z, (2 * ds2)[:, :, None, None]).add_(ds1[:, :, None, None])
        return _conv_backward(torch.ops.aten.threshold_backward(dz, z, 0.0), x, weight)


class GroupedSTSTNet(STSTNet):
    """G STSTNets (each tensor stacked on a new dim 0) fused into one conv 3->16G, _StemFn and BatchNorm after the
    max-pool (docs/design.md); forward(x, mask (B, G)) takes member g's BatchNorm statistics over its samples only."""

    takes_mask = True

    def __init__(self, groups, in_channels=3, num_classes=3, dropout=0.5):
        super().__init__(in_channels, num_classes, dropout)
        self.groups, self.random_generator = groups, None
        stack_members(self, groups)

    def forward(self, x, mask=None):
        convs, bns = (self.conv1, self.conv2, self.conv3), (self.bn1, self.bn2, self.bn3)
        G, B = self.groups, x.shape[0]
        W = sum(c.weight.shape[1] for c in convs)
        weight = torch.cat([c.weight for c in convs], 1).reshape(G * W, *self.conv1.weight.shape[2:])
        bias = torch.cat([c.bias for c in convs], 1).reshape(G * W)
        gamma, beta = torch.cat([bn.weight for bn in bns], 1), torch.cat([bn.bias for bn in bns], 1)  # (G, W)
        need_min = bool((gamma < 0).any())
        x = x.contiguous(memory_format=torch.channels_last)
        if self.training:
            mask = x.new_ones(B, G) if mask is None else mask
            s1, s2, pmax, pmin = _StemFn.apply(x, weight, bias, need_min)
            count = mask.sum(0)                                # (G,)
            n = (count * pmax.new_tensor(float((x.shape[2] + 2) * (x.shape[3] + 2)))).clamp(min=1)
            mean = torch.einsum("bg,bgc->gc", mask, s1.view(B, G, W)) / n[:, None]
            ex2 = torch.einsum("bg,bgc->gc", mask, s2.view(B, G, W)) / n[:, None]
            var = (ex2 - mean * mean).clamp(min=0)
            self._update_running(mean.detach(), var.detach(), n, count)
        else:
            with torch.no_grad():
                z = F.conv2d(x, weight, bias, padding=2).relu_()
                pmax = F.max_pool2d(z, 3, 3, 1)
                pmin = F.max_pool2d(z.neg_(), 3, 3, 1).neg_() if need_min else None
            mean = torch.cat([bn.running_mean for bn in bns], 1)
            var = torch.cat([bn.running_var for bn in bns], 1)
        scale = gamma * torch.rsqrt(var + self.bn1.eps)        # (G, W)
        shift = beta - mean * scale
        h = pmax.view(B, G, W, *pmax.shape[2:]) if pmax.is_contiguous() else pmax.reshape(B, G, W, *pmax.shape[2:])
        if need_min:
            h = torch.where((gamma > 0)[None, :, :, None, None], h, pmin.reshape(B, G, W, *pmin.shape[2:]))
        h = torch.addcmul(shift[None, :, :, None, None], h, scale[None, :, :, None, None])  # (B, G, W, 10, 10)
        if self.training and self.dropout.p > 0:
            h = h * dropout_mask(h.shape, self.dropout.p, self.random_generator, h.device)
        # avgpool 2x2 then fc == one linear map of the 10x10 maps with fc's weights spread over
        # each 2x2 window / 4 (avg_pool2d's backward alone cost more than this whole head)
        fc_w, side = self.fc.weight, h.shape[-1] // 2                                # (G, O, W*25)
        w_full = fc_w.reshape(G, -1, W, side, 1, side, 1).expand(-1, -1, -1, -1, 2, -1, 2)
        w_full = w_full.reshape(G, fc_w.shape[1], W * 4 * side * side) * 0.25
        h = h[..., :2 * side, :2 * side].reshape(B, G, -1).transpose(0, 1)          # (G, B, W*100)
        return torch.baddbmm(self.fc.bias[:, None, :], h, w_full.transpose(1, 2)).transpose(0, 1)  # (B, G, O)

    @torch.no_grad()
    def _update_running(self, mean, var, n, count):
        unbiased = var * (n / (n - 1).clamp(min=1))[:, None]
        active = (count > 0)[:, None]
        start = 0
        for bn in (self.bn1, self.bn2, self.bn3):
            part, m = slice(start, start + bn.running_mean.shape[1]), bn.momentum
            bn.running_mean.copy_(torch.where(active, bn.running_mean * (1 - m) + mean[:, part] * m, bn.running_mean))
            bn.running_var.copy_(torch.where(active, bn.running_var * (1 - m) + unbiased[:, part] * m, bn.running_var))
            bn.num_batches_tracked.add_(active[:, 0].long())
            start = part.stop


class LinearForVmap(torch.nn.Linear):
    """nn.Linear computed as (W x^T)^T: vmapped over members it is one baddbmm whose weight gradient comes out
    contiguous (F.linear's comes out transposed, and copying it made the step 3x slower on the CPU)."""

    def forward(self, x):
        if self.bias is None or x.dim() != 2:
            return super().forward(x)
        return torch.addmm(self.bias[:, None], self.weight, x.t()).t()


class Stacked(torch.nn.Module):
    """G plain models of a class without batch statistics (no BatchNorm: members share nothing but the input) as one:
    the plain model's modules with each tensor stacked on a new dim 0; forward(x) -> (B, G, O) is the plain forward
    vmapped over the members (torch.func; dropout draws each member's own mask)."""

    def __init__(self, cls, groups, config):
        super().__init__()
        plain, template = cls(**config), cls(**config)
        for module in list(template.modules()):   # the template computes; its own tensors are never used
            for name, child in module.named_children():
                if type(child) is torch.nn.Linear:
                    setattr(module, name, LinearForVmap(child.in_features, child.out_features, child.bias is not None))
        self.groups, self.template = groups, (template,)   # a tuple: the template stays out of the state_dict
        for name, child in plain.named_children():
            self.add_module(name, child)
        stack_members(self, groups)

    def forward(self, x):
        template = self.template[0].train(self.training)
        state = {**dict(self.named_parameters()), **dict(self.named_buffers())}
        logits = torch.func.vmap(lambda member: torch.func.functional_call(template, member, (x,)),
                                 randomness="different")(state)
        return logits.transpose(0, 1)


GROUPED = {"htnet": lambda groups, config: HTNet(groups=groups, **config),
           "ststnet": lambda groups, config: GroupedSTSTNet(groups, **config),
           "offapexnet": lambda groups, config: Stacked(OFFApexNet, groups, config),
           "dual_inception": lambda groups, config: Stacked(DualInception, groups, config)}
