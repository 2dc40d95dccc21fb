"""HTNet (Wang et al. 2024; wangzhifengharrison/HTNet's Model.HTNet, whose saved weights load strictly), and with
`groups=G` G independent fold-models as one (grouped convolutions, per-group LayerNorm and attention)."""
import numbers
from collections import OrderedDict

import torch
import torch.nn.functional as F
from einops import rearrange
from einops.layers.torch import Rearrange, Reduce
from torch import einsum, nn

from htnet.errors import UserError
from htnet.models.registry import dropout_rate, positive_int, register_model

def per_group(x, groups):
    """(groups * b, ...) as (groups, b, ...): with groups=G member g's copy of the batch is block g of a
    (G * b, c, h, w) batch (a grouped weight is the members' concatenated along dim 0); groups=1: x as it is."""
    return x if groups == 1 else x.unflatten(0, (groups, -1))


class LayerNorm(nn.Module):
    """LayerNorm over the channel dimension of a (b, c, h, w) map."""

    def __init__(self, dim, eps=1e-5, groups=1):
        super().__init__()
        self.eps, self.groups = eps, groups
        self.g = nn.Parameter(torch.ones(groups, dim, 1, 1))
        self.b = nn.Parameter(torch.zeros(groups, dim, 1, 1))

    def forward(self, x):
        if self.groups == 1:  # the reference's operations
            var = torch.var(x, dim=1, unbiased=False, keepdim=True)
            mean = torch.mean(x, dim=1, keepdim=True)
            return (x - mean) / (var + self.eps).sqrt() * self.g + self.b
        x = F.layer_norm(x.movedim(1, -1), x.shape[1:2], eps=self.eps).movedim(-1, 1)  # the same, fused
        return torch.addcmul(self.b[:, None], per_group(x, self.groups), self.g[:, None]).flatten(0, 1)


class GroupConv(nn.Conv2d):
    """nn.Conv2d(dim, out, kernel_size); with groups, one per member."""

    def __init__(self, dim, out, kernel_size=1, groups=1, **kwargs):
        super().__init__(dim * groups, out * groups, kernel_size, groups=groups, **kwargs)

    def forward(self, x):
        G = self.groups
        if G == 1:
            return super().forward(x)
        if self.kernel_size == (1, 1):  # a batched matmul: CPU grouped convolutions are slow
            _, C, h, w = x.shape
            x = x.view(G, -1, C, h * w).transpose(2, 3).reshape(G, -1, C)   # a view for 1x1 maps
            weight = self.weight.view(G, -1, C).transpose(1, 2)
            x = torch.bmm(x, weight) if self.bias is None else torch.baddbmm(self.bias.view(G, 1, -1), x, weight)
            return x.view(G, -1, h * w, x.shape[-1]).transpose(2, 3).reshape(-1, x.shape[-1], h, w)
        x = super().forward(x.unflatten(0, (G, -1)).transpose(0, 1).flatten(1, 2))   # (b, G * c, h, w)
        return x.unflatten(1, (G, -1)).transpose(0, 1).flatten(0, 1)


class GroupLinear(nn.Linear):
    """nn.Linear(dim, out); with groups, one per member."""

    def __init__(self, dim, out, groups=1):
        super().__init__(dim, out * groups)
        self.groups = groups

    def forward(self, x):
        G = self.groups
        if G == 1:
            return super().forward(x)
        weight = self.weight.view(G, -1, x.shape[-1]).transpose(1, 2)
        x = torch.baddbmm(self.bias.view(G, 1, -1), x.view(G, -1, x.shape[-1]), weight)   # (G, b, out)
        return x.transpose(0, 1).flatten(1)


def PreNorm(dim, fn, groups=1):
    return nn.Sequential(OrderedDict(norm=LayerNorm(dim, groups=groups), fn=fn))


def FeedForward(dim, mlp_mult=4, dropout=0., groups=1):
    """The reference's FeedForward (its `net` names the weights)."""
    return nn.Sequential(OrderedDict(net=nn.Sequential(
        GroupConv(dim, dim * mlp_mult, groups=groups), nn.GELU(), nn.Dropout(dropout),
        GroupConv(dim * mlp_mult, dim, groups=groups), nn.Dropout(dropout))))


class Attention(nn.Module):
    """Multi-head self-attention over the h*w positions of a map; each head gets dim // heads
    channels (so heads need not divide dim: dim 256, 3 heads -> 3 x 85 = 255 inner channels)."""

    def __init__(self, dim, heads=8, dropout=0., groups=1):
        super().__init__()
        dim_head = dim // heads
        inner_dim = dim_head * heads
        self.heads, self.scale = heads, dim_head ** -0.5
        self.attend = nn.Softmax(dim=-1)
        self.dropout = nn.Dropout(dropout)
        self.to_qkv = GroupConv(dim, inner_dim * 3, bias=False, groups=groups)
        self.to_out = nn.Sequential(GroupConv(inner_dim, dim, groups=groups), nn.Dropout(dropout))

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = (rearrange(t, "b (h d) x y -> b h (x y) d", h=self.heads) for t in self.to_qkv(x).chunk(3, dim=1))
        if h * w > 1 or (self.training and self.dropout.p > 0):
            attn = self.dropout(self.attend(einsum("b h i d, b h j d -> b h i j", q, k) * self.scale))
            v = einsum("b h i j, b h j d -> b h i d", attn, v)
        # else softmax over one position is exactly 1: the output is v (the paper config's 1x1 blocks)
        return self.to_out(rearrange(v, "b h (x y) d -> b (h d) x y", x=h, y=w))


def Aggregate(dim, dim_out, groups=1):
    """conv3x3 to the next level's width, LayerNorm, then halve the map."""
    return nn.Sequential(GroupConv(dim, dim_out, 3, groups=groups, padding=1), LayerNorm(dim_out, groups=groups),
                         nn.MaxPool2d(3, stride=2, padding=1))


class Transformer(nn.Module):
    def __init__(self, dim, seq_len, depth, heads, mlp_mult, dropout=0., groups=1):
        super().__init__()
        self.groups = groups
        self.pos_emb = nn.Parameter(torch.randn(seq_len * groups))  # one scalar per position in a block
        self.layers = nn.ModuleList([nn.ModuleList([
            PreNorm(dim, Attention(dim, heads, dropout, groups), groups),
            PreNorm(dim, FeedForward(dim, mlp_mult, dropout, groups), groups)]) for _ in range(depth)])

    def forward(self, x):
        h, w = x.shape[-2:]
        pos_emb = self.pos_emb.view(self.groups, 1, 1, -1)[..., :h * w].unflatten(-1, (h, w))
        x = (per_group(x, self.groups) + (pos_emb if self.groups > 1 else pos_emb[0])).reshape(x.shape)
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return x


def check_config(block_repeats, dropout, **ints):
    """The arguments normalised (block_repeats one int per level), or UserError where they cannot be built."""
    ints = {name: positive_int("htnet", name, value) for name, value in ints.items()}
    image_size, patch_size, levels = ints["image_size"], ints["patch_size"], ints["num_hierarchies"]
    dropout = dropout_rate("htnet", "dropout", dropout)
    if image_size % patch_size:
        raise UserError(f"htnet: image_size {image_size} is not divisible by patch_size {patch_size}")
    if ints["heads"] > ints["dim"]:
        raise UserError(f"htnet: heads {ints['heads']} exceeds dim {ints['dim']} "
                        f"(each head gets dim // heads channels, at least one)")
    # level L-1 cuts the patch grid into 2^(L-1) blocks per side; each Aggregate halves the map
    # while the next level halves the blocks per side, so the grid must split evenly at the top
    fmap_size = image_size // patch_size
    if levels > fmap_size.bit_length() or fmap_size % 2 ** (levels - 1):   # (no 2^huge computed)
        blocks = f"{2 ** (levels - 1)}x{2 ** (levels - 1)}" if levels <= 32 else f"2^{levels - 1} x 2^{levels - 1}"
        raise UserError(f"htnet: num_hierarchies {levels} needs the {fmap_size}x{fmap_size} patch grid "
                        f"(image_size {image_size} / patch_size {patch_size}) to split into {blocks} blocks")
    listed = isinstance(block_repeats, (list, tuple))
    repeats = list(block_repeats) if listed else [block_repeats] * levels   # one for every level (cast_tuple)
    if len(repeats) != levels or any(isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1
                                     for r in repeats):
        raise UserError(f"htnet: block_repeats {repeats if listed else block_repeats} must be {levels} positive "
                        f"integers, one per hierarchy (num_hierarchies {levels})")
    return dict(ints, block_repeats=tuple(map(int, repeats)), dropout=dropout)


@register_model("htnet", input_kind="face_crops")
class HTNet(nn.Module):
    """(B, channels, image_size, image_size) -> (B, groups * num_classes) logits, NesT-style: level i (from the top)
    has 2^i dim channels and heads; the patch grid is cut into 2^(L-1) x 2^(L-1) blocks that attend within
    themselves, each Aggregate halving the map (seq_len tokens per block). dim_head: the reference's, unused."""

    def __init__(self, *, image_size=28, patch_size=7, num_classes=3, dim=256, heads=3, num_hierarchies=3,
                 block_repeats=(2, 2, 10), mlp_mult=4, channels=3, dim_head=64, dropout=0., groups=1):
        super().__init__()
        self.groups = groups
        c = check_config(block_repeats, dropout, image_size=image_size, patch_size=patch_size, num_classes=num_classes,
                         dim=dim, heads=heads, num_hierarchies=num_hierarchies, mlp_mult=mlp_mult, channels=channels)
        patch_size, levels = c["patch_size"], c["num_hierarchies"]
        seq_len = (c["image_size"] // patch_size // 2 ** (levels - 1)) ** 2  # tokens per block, at every level
        dims = [2 ** i * c["dim"] for i in range(levels)]
        self.to_patch_embedding = nn.Sequential(
            Rearrange("b c (h p1) (w p2) -> b (p1 p2 c) h w", p1=patch_size, p2=patch_size),
            nn.Conv2d(c["channels"] * patch_size ** 2, dims[0] * groups, 1))
        self.layers = nn.ModuleList([nn.ModuleList([
            Transformer(dims[i], seq_len, depth, 2 ** i * c["heads"], c["mlp_mult"], c["dropout"], groups),
            Aggregate(dims[i], dims[i + 1], groups) if i + 1 < levels else nn.Identity()])
            for i, depth in enumerate(c["block_repeats"])])
        self.mlp_head = nn.Sequential(LayerNorm(dims[-1], groups=groups), Reduce("b c h w -> b c", "mean"),
                                      GroupLinear(dims[-1], c["num_classes"], groups))

    def forward(self, img):
        x = self.to_patch_embedding(img)   # the members share the input: (b, groups * dim, h, w)
        if self.groups > 1:
            x = x.unflatten(1, (self.groups, -1)).transpose(0, 1).flatten(0, 1)
        for level, (transformer, aggregate) in zip(reversed(range(len(self.layers))), self.layers):
            blocks = 2 ** level
            x = rearrange(x, "b c (b1 h) (b2 w) -> (b b1 b2) c h w", b1=blocks, b2=blocks)
            x = rearrange(transformer(x), "(b b1 b2) c h w -> b c (b1 h) (b2 w)", b1=blocks, b2=blocks)
            x = aggregate(x)
        return self.mlp_head(x)
