"""HTNet (Wang et al. 2024): a hierarchical transformer over four facial-region flow crops.

The reference architecture (wangzhifengharrison/HTNet, Model.py, class HTNet), itself NesT
(lucidrains/vit-pytorch, nest.py) with four changes: the channel LayerNorm divides by
sqrt(var + eps), attention weights get dropout, Aggregate pools with MaxPool2d(3, stride 2,
padding 1), and the width grows with depth (dim, 2 dim, 4 dim, ...) so the head reads the last,
widest level.

Module and parameter names are the reference's, so a state_dict saved by the reference
`Model.HTNet` loads here with strict=True (tests/unit/test_models.py checks it against a copy).

Feature maps stay (b, c, h, w) throughout: attention and feed-forward are 1x1 convolutions and the
LayerNorm is over channels. With L = num_hierarchies, the patch grid (image_size / patch_size)
is cut into 2^(L-1) x 2^(L-1) blocks that attend only within themselves; each Aggregate (conv3x3,
LayerNorm, maxpool) halves the map and doubles the width, and the next level uses half as many
blocks per side, so every block always holds the same seq_len tokens. The last level (a single
block: the whole map) has no Aggregate.
"""
import numbers

import torch
from einops import rearrange
from einops.layers.torch import Rearrange, Reduce
from torch import einsum, nn

from htnet.errors import UserError
from htnet.models.registry import dropout_rate, positive_int, register_model


class LayerNorm(nn.Module):
    """LayerNorm over the channel dimension of a (b, c, h, w) map."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.g = nn.Parameter(torch.ones(1, dim, 1, 1))
        self.b = nn.Parameter(torch.zeros(1, dim, 1, 1))

    def forward(self, x):
        var = torch.var(x, dim=1, unbiased=False, keepdim=True)
        mean = torch.mean(x, dim=1, keepdim=True)
        return (x - mean) / (var + self.eps).sqrt() * self.g + self.b


class PreNorm(nn.Module):
    def __init__(self, dim, fn):
        super().__init__()
        self.norm = LayerNorm(dim)
        self.fn = fn

    def forward(self, x):
        return self.fn(self.norm(x))


class FeedForward(nn.Module):
    def __init__(self, dim, mlp_mult=4, dropout=0.):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(dim, dim * mlp_mult, 1),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Conv2d(dim * mlp_mult, dim, 1),
            nn.Dropout(dropout),
        )

    def forward(self, x):
        return self.net(x)


class Attention(nn.Module):
    """Multi-head self-attention over the h*w positions of a map; each head gets dim // heads
    channels (so heads need not divide dim: dim 256, 3 heads -> 3 x 85 = 255 inner channels)."""

    def __init__(self, dim, heads=8, dropout=0.):
        super().__init__()
        dim_head = dim // heads
        inner_dim = dim_head * heads
        self.heads = heads
        self.scale = dim_head ** -0.5

        self.attend = nn.Softmax(dim=-1)
        self.dropout = nn.Dropout(dropout)
        self.to_qkv = nn.Conv2d(dim, inner_dim * 3, 1, bias=False)
        self.to_out = nn.Sequential(
            nn.Conv2d(inner_dim, dim, 1),
            nn.Dropout(dropout),
        )

    def forward(self, x):
        b, c, h, w = x.shape
        qkv = self.to_qkv(x).chunk(3, dim=1)
        q, k, v = (rearrange(t, "b (h d) x y -> b h (x y) d", h=self.heads) for t in qkv)

        dots = einsum("b h i d, b h j d -> b h i j", q, k) * self.scale
        attn = self.dropout(self.attend(dots))

        out = einsum("b h i j, b h j d -> b h i d", attn, v)
        out = rearrange(out, "b h (x y) d -> b (h d) x y", x=h, y=w)
        return self.to_out(out)


def Aggregate(dim, dim_out):
    """conv3x3 to the next level's width, LayerNorm, then halve the map."""
    return nn.Sequential(
        nn.Conv2d(dim, dim_out, 3, padding=1),
        LayerNorm(dim_out),
        nn.MaxPool2d(3, stride=2, padding=1),
    )


class Transformer(nn.Module):
    def __init__(self, dim, seq_len, depth, heads, mlp_mult, dropout=0.):
        super().__init__()
        self.layers = nn.ModuleList([])
        self.pos_emb = nn.Parameter(torch.randn(seq_len))  # one scalar per position in a block
        for _ in range(depth):
            self.layers.append(nn.ModuleList([
                PreNorm(dim, Attention(dim, heads=heads, dropout=dropout)),
                PreNorm(dim, FeedForward(dim, mlp_mult, dropout=dropout)),
            ]))

    def forward(self, x):
        *_, h, w = x.shape
        pos_emb = rearrange(self.pos_emb[:(h * w)], "(h w) -> () () h w", h=h, w=w)
        x = x + pos_emb
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return x


def check_config(image_size, patch_size, num_classes, dim, heads, num_hierarchies, block_repeats, mlp_mult,
                 channels, dropout):
    """Reject configurations the architecture cannot build or run, before any weights exist.

    Returns the arguments normalised (ints, block_repeats a tuple of num_hierarchies ints).
    """
    ints = dict(image_size=image_size, patch_size=patch_size, num_classes=num_classes, dim=dim, heads=heads,
                num_hierarchies=num_hierarchies, mlp_mult=mlp_mult, channels=channels)
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

    shown = list(block_repeats) if isinstance(block_repeats, (list, tuple)) else block_repeats
    if not isinstance(block_repeats, (list, tuple)):
        block_repeats = (block_repeats,) * levels   # one value for every level, as the reference's cast_tuple
    if len(block_repeats) != levels or any(
            isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1 for r in block_repeats):
        raise UserError(f"htnet: block_repeats {shown} must be {levels} positive integers, one per hierarchy "
                        f"(num_hierarchies {levels})")
    return dict(ints, block_repeats=tuple(int(r) for r in block_repeats), dropout=dropout)


@register_model("htnet", input_kind="face_crops")
class HTNet(nn.Module):
    """Input (B, channels, image_size, image_size), output (B, num_classes) logits.

    dim and heads are the top level's; level i (from the top) has 2^i dim channels and 2^i heads.
    dim_head is accepted for the reference's signature but, as there (and in NesT), unused: each
    head gets dim // heads channels.
    """

    def __init__(self, *, image_size=28, patch_size=7, num_classes=3, dim=256, heads=3, num_hierarchies=3,
                 block_repeats=(2, 2, 10), mlp_mult=4, channels=3, dim_head=64, dropout=0.):
        super().__init__()
        c = check_config(image_size, patch_size, num_classes, dim, heads, num_hierarchies, block_repeats,
                         mlp_mult, channels, dropout)
        image_size, patch_size, num_hierarchies = c["image_size"], c["patch_size"], c["num_hierarchies"]
        patch_dim = c["channels"] * patch_size ** 2
        fmap_size = image_size // patch_size
        blocks = 2 ** (num_hierarchies - 1)

        seq_len = (fmap_size // blocks) ** 2  # tokens per block, the same at every level
        hierarchies = list(reversed(range(num_hierarchies)))   # L-1, ..., 0
        mults = [2 ** i for i in reversed(hierarchies)]         # 1, 2, ..., 2^(L-1)

        layer_heads = [m * c["heads"] for m in mults]
        layer_dims = [m * c["dim"] for m in mults]
        last_dim = layer_dims[-1]

        layer_dims = [*layer_dims, layer_dims[-1]]
        dim_pairs = zip(layer_dims[:-1], layer_dims[1:])
        self.to_patch_embedding = nn.Sequential(
            Rearrange("b c (h p1) (w p2) -> b (p1 p2 c) h w", p1=patch_size, p2=patch_size),
            nn.Conv2d(patch_dim, layer_dims[0], 1),
        )

        self.layers = nn.ModuleList([])
        for level, level_heads, (dim_in, dim_out), depth in zip(hierarchies, layer_heads, dim_pairs,
                                                                c["block_repeats"]):
            is_last = level == 0
            self.layers.append(nn.ModuleList([
                Transformer(dim_in, seq_len, depth, level_heads, c["mlp_mult"], c["dropout"]),
                Aggregate(dim_in, dim_out) if not is_last else nn.Identity(),
            ]))

        self.mlp_head = nn.Sequential(
            LayerNorm(last_dim),
            Reduce("b c h w -> b c", "mean"),
            nn.Linear(last_dim, c["num_classes"]),
        )

    def forward(self, img):
        x = self.to_patch_embedding(img)
        num_hierarchies = len(self.layers)
        for level, (transformer, aggregate) in zip(reversed(range(num_hierarchies)), self.layers):
            block_size = 2 ** level
            x = rearrange(x, "b c (b1 h) (b2 w) -> (b b1 b2) c h w", b1=block_size, b2=block_size)
            x = transformer(x)
            x = rearrange(x, "(b b1 b2) c h w -> b c (b1 h) (b2 w)", b1=block_size, b2=block_size)
            x = aggregate(x)
        return self.mlp_head(x)
