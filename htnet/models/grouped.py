"""Fold-grouped versions of the models: G independent fold-models evaluated as one computation.

A grouped model holds, for every tensor of the plain model's state_dict, one stacked tensor of shape
(G, *plain_shape) under the plain name (dots spelled `__`, as nn.ParameterDict wants). So
`fold_state_dict(g)` is exactly the plain model's state_dict for fold-model g (strict-loadable), and
`from_states([sd_0, ..., sd_G-1])` starts the group from G plain models (same seeded initialisation
as the plain engine). The forward pass reads the stacked tensors through cheap views and `cat`s.

Every fold-model sees the same input batch `x` (B, 3, 28, 28) (the folds share the data set and
differ only by which samples they hold out); `forward(x, mask)` returns logits (B, G, classes).
`mask` (B, G), 1 where sample b is in fold-model g's training set, matters only where the model
mixes samples: BatchNorm's batch statistics (STSTNet). The loss mask lives in the engine.

GroupedSTSTNet: the three streams are one conv 3->16 (the concatenated weights; BatchNorm is per
channel, so bn1|bn2|bn3 is one BN(16)) and the G fold-models one conv 3->16G on the shared input.
The full-resolution part (conv, ReLU, per-sample channel sums, max-pool) is one autograd Function
with a hand-written backward that touches each full-resolution tensor as few times as it can;
BatchNorm's affine map is applied *after* the max-pool (max-pool commutes with x -> a x + b for
a > 0; for a < 0 a min-pool is used), so BN, dropout and the rest run on 1/9 of the data.
Masked batch statistics: per-sample sums s1 = sum_hw z, s2 = sum_hw z^2 (B, 16G), then
mask^T @ s1 gives each fold-model's mean/variance over its own training samples only (the held-out
subject never enters a BN statistic: no transductive leak).

GroupedHTNet: per-fold weights stacked along G; every 1x1 convolution is a batched matmul over
(G, tokens, C), LayerNorm is over channels per fold, attention is per sample and block
(scaled_dot_product_attention, the same math as the reference's einsum/softmax), Aggregate's 3x3
convolution is a grouped convolution (groups=G). No sample mixing, so no mask.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from htnet import kernels
from htnet.models import create_model


def _key(name):
    return name.replace(".", "__")


class GroupedModel(nn.Module):
    """Stacked plain state_dicts; subclasses implement forward(x, mask=None) -> (B, G, classes)."""

    plain_name = None

    def __init__(self, states, config):
        super().__init__()
        self.config = dict(config)
        self.groups = len(states)
        template = create_model(self.plain_name, **self.config)
        self.param_names = [n for n, _ in template.named_parameters()]
        self.buffer_names = [n for n, _ in template.named_buffers()]
        self.state_names = list(template.state_dict())
        self.params = nn.ParameterDict()
        for name in self.param_names:
            self.params[_key(name)] = nn.Parameter(torch.stack([s[name] for s in states]).float().clone())
        for name in self.buffer_names:
            self.register_buffer(_key(name), torch.stack([s[name] for s in states]).clone())
        self.setup(template)

    def setup(self, template):
        pass

    @classmethod
    def from_states(cls, states, config):
        return cls(states, config)

    def p(self, name):
        return self.params[_key(name)]

    def b(self, name):
        return getattr(self, _key(name))

    def fold_state_dict(self, g):
        """Fold-model g's weights as the plain model's state_dict (on the CPU, detached)."""
        out = {}
        for name in self.state_names:
            t = self.params[_key(name)] if name in self.param_names else getattr(self, _key(name))
            out[name] = t[g].detach().cpu().clone()
        return out



# --------------------------------------------------------------------------------------- STSTNet

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


def _layout(t):
    return torch.channels_last if t.dim() == 4 and not t.is_contiguous() and \
        t.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format


class _StemFn(torch.autograd.Function):
    """z = relu(conv2d(x, w, b, padding=2)); returns per-sample channel sums of z and z^2 and the
    3x3/stride-3 max-pool of z (plus the min-pool when asked). x needs no gradient (the data)."""

    @staticmethod
    def forward(ctx, x, weight, bias, need_min):
        z = F.conv2d(x, weight, bias, padding=2)
        lib = kernels.cpu_kernels() if not need_min and kernels.applies_to(z) else None
        ctx.kernel = lib
        if lib is not None:
            s1, s2, pmax, idx_max = kernels.stem_forward(lib, z)
        else:
            z = z.relu_()
            s1 = z.sum((2, 3))
            s2 = torch.mul(z, z).sum((2, 3))
            pmax, idx_max = F.max_pool2d(z, 3, 3, 1, return_indices=True)
        if need_min:
            pmin, idx_min = F.max_pool2d(z.neg(), 3, 3, 1, return_indices=True)
            pmin = pmin.neg_()
        else:
            pmin, idx_min = pmax.new_zeros(0), None
        ctx.save_for_backward(x, weight, z, idx_max, idx_min if need_min else idx_max.new_zeros(0))
        ctx.need_min = need_min
        return s1, s2, pmax, pmin

    @staticmethod
    def backward(ctx, ds1, ds2, dpmax, dpmin):
        x, weight, z, idx_max, idx_min = ctx.saved_tensors
        B, C = z.shape[:2]
        # d/dz of s1 and s2: ds1 + 2 z ds2, broadcast over the map
        if ds2 is None:
            ds2 = z.new_zeros(B, C)
        if ds1 is None:
            ds1 = z.new_zeros(B, C)
        if ctx.kernel is not None:
            dz = kernels.stem_backward(ctx.kernel, z, idx_max, dpmax, ds1, ds2)
            _, dw, db = torch.ops.aten.convolution_backward(
                dz, x, weight, [weight.shape[0]], [1, 1], [2, 2], [1, 1], False, [0, 0], 1, [False, True, True])
            return None, dw, db, None
        # the max-pool's gradient lands on the argmax positions; then + ds1 + 2 z ds2 in place
        dz = torch.ops.aten.max_pool2d_with_indices_backward(
            dpmax.to(z.dtype).contiguous(memory_format=_layout(z)), z, [3, 3], [3, 3], [1, 1], [1, 1], False, idx_max)
        if ctx.need_min and dpmin is not None and dpmin.numel():
            dz.flatten(2).scatter_add_(2, idx_min.flatten(2), dpmin.flatten(2).to(dz.dtype))
        dz.addcmul_(z, (2 * ds2)[:, :, None, None]).add_(ds1[:, :, None, None])
        dz = torch.ops.aten.threshold_backward(dz, z, 0.0)
        _, dw, db = torch.ops.aten.convolution_backward(
            dz, x, weight, [weight.shape[0]], [1, 1], [2, 2], [1, 1], False, [0, 0], 1, [False, True, True])
        return None, dw, db, None


class GroupedSTSTNet(GroupedModel):
    plain_name = "ststnet"
    STREAMS = ("1", "2", "3")

    def setup(self, template):
        self.dropout = template.dropout.p
        self.eps = template.bn1.eps
        self.momentum = template.bn1.momentum
        self.widths = [getattr(template, f"conv{s}").out_channels for s in self.STREAMS]
        self.width = sum(self.widths)
        self.num_classes = template.fc.out_features
        self.channels_last = True
        self.random_generator = None

    def _cat(self, fmt):
        return torch.cat([self.p(fmt.format(s)) for s in self.STREAMS], dim=1)

    def _cat_buffer(self, fmt):
        return torch.cat([self.b(fmt.format(s)) for s in self.STREAMS], dim=1)

    def prepare_input(self, x):
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x.contiguous()

    def forward(self, x, mask=None):
        G, W, B = self.groups, self.width, x.shape[0]
        weight = self._cat("conv{}.weight").reshape(G * W, *self.p("conv1.weight").shape[2:])
        bias = self._cat("conv{}.bias").reshape(G * W)
        gamma = self._cat("bn{}.weight")                      # (G, W)
        beta = self._cat("bn{}.bias")
        need_min = bool((gamma < 0).any())
        x = self.prepare_input(x)
        if self.training:
            if mask is None:
                mask = x.new_ones(B, G)
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
            mean, var = self._cat_buffer("bn{}.running_mean"), self._cat_buffer("bn{}.running_var")
        scale = gamma * torch.rsqrt(var + self.eps)            # (G, W)
        shift = beta - mean * scale
        h = pmax.view(B, G, W, *pmax.shape[2:]) if pmax.is_contiguous() else \
            pmax.reshape(B, G, W, *pmax.shape[2:])
        if need_min:
            lo = pmin.reshape(B, G, W, *pmin.shape[2:])
            h = torch.where((gamma > 0)[None, :, :, None, None], h, lo)
        h = torch.addcmul(shift[None, :, :, None, None], h, scale[None, :, :, None, None])  # (B,G,W,10,10)
        if self.training and self.dropout > 0:
            h = h * dropout_mask(h.shape, self.dropout, self.random_generator, h.device)
        # avgpool 2x2 then fc == one linear map of the 10x10 maps with fc's weights spread over
        # each 2x2 window / 4 (avg_pool2d's backward alone cost more than this whole head)
        fc_w, fc_b = self.p("fc.weight"), self.p("fc.bias")                       # (G, O, W*25), (G, O)
        side = h.shape[-1] // 2
        w_full = fc_w.reshape(G, -1, W, side, 1, side, 1).expand(-1, -1, -1, -1, 2, -1, 2)
        w_full = w_full.reshape(G, fc_w.shape[1], W * 4 * side * side) * 0.25
        h = h[..., :2 * side, :2 * side].reshape(B, G, -1).transpose(0, 1)          # (G, B, W*100)
        logits = torch.baddbmm(fc_b[:, None, :], h, w_full.transpose(1, 2))       # (G, B, O)
        return logits.transpose(0, 1)

    @torch.no_grad()
    def _update_running(self, mean, var, n, count):
        momentum = self.momentum
        unbiased = var * (n / (n - 1).clamp(min=1))[:, None]
        active = (count > 0)[:, None]
        start = 0
        for s, width in zip(self.STREAMS, self.widths):
            rm, rv = self.b(f"bn{s}.running_mean"), self.b(f"bn{s}.running_var")
            part = slice(start, start + width)
            rm.copy_(torch.where(active, rm * (1 - momentum) + mean[:, part] * momentum, rm))
            rv.copy_(torch.where(active, rv * (1 - momentum) + unbiased[:, part] * momentum, rv))
            self.b(f"bn{s}.num_batches_tracked").add_(active[:, 0].long())
            start += width


# ----------------------------------------------------------------------------------------- HTNet

def _layer_norm(x, g, b, eps):
    """LayerNorm over the last (channel) dim of x (G, ..., C) with per-fold g, b of shape (G, C)."""
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
    return torch.addcmul(b.reshape(shape), F.layer_norm(x, x.shape[-1:], eps=eps), g.reshape(shape))


def _linear(x, weight, bias=None):
    """Per-fold 1x1 convolution: x (G, ..., C) @ weight (G, O, C[, 1, 1])^T + bias (G, O)."""
    G, C = x.shape[0], x.shape[-1]
    w = weight.reshape(G, weight.shape[1], C)
    flat = x.reshape(G, -1, C)
    out = torch.bmm(flat, w.transpose(1, 2)) if bias is None else \
        torch.baddbmm(bias[:, None, :], flat, w.transpose(1, 2))
    return out.reshape(*x.shape[:-1], w.shape[1])


class GroupedHTNet(GroupedModel):
    plain_name = "htnet"

    def setup(self, template):
        channels = template.to_patch_embedding[1].in_channels
        self.patch = math.isqrt(channels // self.config.get("channels", 3))
        self.levels = []
        for i, (transformer, aggregate) in enumerate(template.layers):
            blocks = []
            for j, (attn, ff) in enumerate(transformer.layers):
                blocks.append((f"layers.{i}.0.layers.{j}", attn.fn.heads, attn.fn.scale,
                               ff.fn.net[2].p, attn.fn.dropout.p))
            self.levels.append((i, blocks, not isinstance(aggregate, nn.Identity)))
        self.eps = 1e-5

    def forward(self, img, mask=None):
        G, B, p = self.groups, img.shape[0], self.patch
        c, H, W = img.shape[1], img.shape[2] // p, img.shape[3] // p
        # to_patch_embedding: "b c (h p1) (w p2) -> b (p1 p2 c) h w" then a 1x1 conv, here on (h w) tokens
        tokens = img.reshape(B, c, H, p, W, p).permute(0, 2, 4, 3, 5, 1).reshape(B, H, W, p * p * c)
        w = self.p("to_patch_embedding.1.weight")
        w = w.reshape(G, w.shape[1], -1)
        x = torch.matmul(tokens.reshape(1, B * H * W, -1), w.transpose(1, 2)) \
            + self.p("to_patch_embedding.1.bias")[:, None, :]
        x = x.reshape(G, B, H, W, -1)                                         # (G, B, H, W, C)
        num_levels = len(self.levels)
        for (i, blocks, has_aggregate), level in zip(self.levels, reversed(range(num_levels))):
            bs = 2 ** level
            h, w_ = x.shape[2] // bs, x.shape[3] // bs
            C = x.shape[-1]
            # "b c (b1 h) (b2 w) -> (b b1 b2) c h w": blocks of h x w tokens
            x = x.reshape(G, B, bs, h, bs, w_, C).permute(0, 1, 2, 4, 3, 5, 6).reshape(G, B * bs * bs, h, w_, C)
            pos = self.p(f"layers.{i}.0.pos_emb")[:, :h * w_].reshape(G, 1, h, w_, 1)
            x = x + pos
            for prefix, heads, scale, ff_drop, attn_drop in blocks:
                x = self._attention(x, prefix + ".0", heads, scale, attn_drop) + x
                x = self._feed_forward(x, prefix + ".1", ff_drop) + x
            x = x.reshape(G, B, bs, bs, h, w_, C).permute(0, 1, 2, 4, 3, 5, 6).reshape(G, B, bs * h, bs * w_, C)
            if has_aggregate:
                x = self._aggregate(x, f"layers.{i}.1")
        x = _layer_norm(x, self.p("mlp_head.0.g").reshape(G, -1), self.p("mlp_head.0.b").reshape(G, -1), self.eps)
        x = x.mean((2, 3))                                                    # (G, B, C)
        logits = torch.baddbmm(self.p("mlp_head.2.bias")[:, None, :], x, self.p("mlp_head.2.weight").transpose(1, 2))
        return logits.transpose(0, 1)                                         # (B, G, classes)

    def _dropout(self, x, p):
        return F.dropout(x, p, self.training) if p > 0 else x

    def _attention(self, x, prefix, heads, scale, attn_drop):
        G, Bb, h, w, C = x.shape
        y = _layer_norm(x, self.p(prefix + ".norm.g").reshape(G, C), self.p(prefix + ".norm.b").reshape(G, C),
                        self.eps)
        qkv = _linear(y, self.p(prefix + ".fn.to_qkv.weight"))              # (G, Bb, h, w, 3 inner)
        inner = qkv.shape[-1] // 3
        d = inner // heads
        q, k, v = qkv.split(inner, dim=-1)
        if h * w == 1 and not (self.training and attn_drop > 0):
            out = v   # softmax over one token is 1: attention returns v (the paper config's 1x1 blocks)
        else:
            q, k, v = (t.reshape(G * Bb, h * w, heads, d).transpose(1, 2) for t in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn_drop if self.training else 0.0,
                                                 scale=scale)
            out = out.transpose(1, 2).reshape(G, Bb, h, w, inner)
        out = _linear(out, self.p(prefix + ".fn.to_out.0.weight"), self.p(prefix + ".fn.to_out.0.bias"))
        return self._dropout(out, attn_drop)

    def _feed_forward(self, x, prefix, p):
        G, C = x.shape[0], x.shape[-1]
        y = _layer_norm(x, self.p(prefix + ".norm.g").reshape(G, C), self.p(prefix + ".norm.b").reshape(G, C),
                        self.eps)
        y = F.gelu(_linear(y, self.p(prefix + ".fn.net.0.weight"), self.p(prefix + ".fn.net.0.bias")))
        y = self._dropout(y, p)
        y = _linear(y, self.p(prefix + ".fn.net.3.weight"), self.p(prefix + ".fn.net.3.bias"))
        return self._dropout(y, p)

    def _aggregate(self, x, prefix):
        G, B, H, W, C = x.shape
        weight = self.p(prefix + ".0.weight")                               # (G, O, C, 3, 3)
        O = weight.shape[1]
        y = x.permute(1, 0, 4, 2, 3).reshape(B, G * C, H, W)
        y = F.conv2d(y, weight.reshape(G * O, C, 3, 3), self.p(prefix + ".0.bias").reshape(G * O),
                     padding=1, groups=G)                                   # (B, G*O, H, W)
        y = y.reshape(B, G, O, H, W).permute(1, 0, 3, 4, 2)                  # (G, B, H, W, O)
        y = _layer_norm(y, self.p(prefix + ".1.g").reshape(G, O), self.p(prefix + ".1.b").reshape(G, O), self.eps)
        y = y.permute(1, 0, 4, 2, 3).reshape(B, G * O, H, W)
        y = F.max_pool2d(y, 3, 2, 1)
        return y.reshape(B, G, O, *y.shape[2:]).permute(1, 0, 3, 4, 2)


GROUPED = {"ststnet": GroupedSTSTNet, "htnet": GroupedHTNet}


def grouped_model(name, states, config):
    """G plain state_dicts -> the grouped model (KeyError where a model has no grouped version)."""
    return GROUPED[name].from_states(states, config)
