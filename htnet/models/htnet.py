"""HTNet (Wang et al. 2024): a hierarchical transformer over four facial-region flow crops.

NesT-style (lucidrains/vit-pytorch nest.py), with the reference's module and parameter names so
that a state_dict saved by the reference `Model.HTNet` loads with strict=True. Feature maps stay
(b, c, h, w) throughout: attention and feed-forward are 1x1 convolutions, the LayerNorm is over
channels. Level l (top = 0) splits the map into 2^l x 2^l blocks that attend only within
themselves, then Aggregate (conv3x3 + LayerNorm + maxpool) halves the map and doubles the width.
"""
import torch
from einops import rearrange
from einops.layers.torch import Rearrange, Reduce
from torch import einsum, nn

from htnet.errors import UserError
from htnet.models import register_model


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
    def __init__(self, dim, heads=8, dropout=0.):
        super().__init__()
        dim_head = dim // heads
        inner_dim = dim_head * heads
        self.heads = heads
        self.scale = dim_head ** -0.5
        self.attend = nn.Softmax(dim=-1)
        self.dropout = nn.Dropout(dropout)
        self.to_qkv = nn.Conv2d(dim, inner_dim * 3, 1, bias=False)
        self.to_out = nn.Sequential(nn.Conv2d(inner_dim, dim, 1), nn.Dropout(dropout))

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.to_qkv(x).chunk(3, dim=1)
        q, k, v = (rearrange(t, "b (h d) x y -> b h (x y) d", h=self.heads) for t in (q, k, v))
        attn = self.dropout(self.attend(einsum("b h i d, b h j d -> b h i j", q, k) * self.scale))
        out = einsum("b h i j, b h j d -> b h i d", attn, v)
        return self.to_out(rearrange(out, "b h (x y) d -> b (h d) x y", x=h, y=w))


def Aggregate(dim, dim_out):
    return nn.Sequential(
        nn.Conv2d(dim, dim_out, 3, padding=1),
        LayerNorm(dim_out),
        nn.MaxPool2d(3, stride=2, padding=1),
    )


class Transformer(nn.Module):
    def __init__(self, dim, seq_len, depth, heads, mlp_mult, dropout=0.):
        super().__init__()
        self.layers = nn.ModuleList([])
        self.pos_emb = nn.Parameter(torch.randn(seq_len))
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


def check_config(image_size, patch_size, dim, heads, num_hierarchies, block_repeats, mlp_mult, channels,
                 num_classes, dropout):
    """Reject configurations the architecture cannot build or run, before any training."""
    for name, value in [("image_size", image_size), ("patch_size", patch_size), ("dim", dim), ("heads", heads),
                        ("num_hierarchies", num_hierarchies), ("mlp_mult", mlp_mult), ("channels", channels),
                        ("num_classes", num_classes)]:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"htnet: {name} must be a positive integer, got {value!r}")
    if image_size % patch_size:
        raise UserError(f"htnet: image_size {image_size} is not divisible by patch_size {patch_size}")
    if heads > dim:
        raise UserError(f"htnet: heads {heads} exceeds dim {dim} (each head needs at least one channel)")
    fmap_size, blocks = image_size // patch_size, 2 ** (num_hierarchies - 1)
    if fmap_size % blocks:
        raise UserError(f"htnet: num_hierarchies {num_hierarchies} needs the {fmap_size}x{fmap_size} patch grid "
                        f"(image_size {image_size} / patch_size {patch_size}) to split into {blocks}x{blocks} blocks")
    if len(block_repeats) != num_hierarchies or any(
            isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in block_repeats):
        raise UserError(f"htnet: block_repeats {list(block_repeats)} must be {num_hierarchies} positive integers, "
                        f"one per hierarchy")
    if not 0 <= dropout < 1:
        raise UserError(f"htnet: dropout must be in [0, 1), got {dropout!r}")


@register_model("htnet", input_kind="face_crops")
class HTNet(nn.Module):
    def __init__(self, *, image_size=28, patch_size=7, num_classes=3, dim=256, heads=3, num_hierarchies=3,
                 block_repeats=(2, 2, 10), mlp_mult=4, channels=3, dim_head=64, dropout=0.):
        super().__init__()
        block_repeats = tuple(block_repeats) if isinstance(block_repeats, (list, tuple)) \
            else (block_repeats,) * num_hierarchies
        check_config(image_size, patch_size, dim, heads, num_hierarchies, block_repeats, mlp_mult, channels,
                     num_classes, dropout)
        patch_dim = channels * patch_size ** 2
        fmap_size = image_size // patch_size
        blocks = 2 ** (num_hierarchies - 1)
        seq_len = (fmap_size // blocks) ** 2  # held constant across the hierarchy
        hierarchies = list(reversed(range(num_hierarchies)))
        mults = [2 ** i for i in reversed(hierarchies)]
        layer_heads = [m * heads for m in mults]
        layer_dims = [m * dim for m in mults]
        last_dim = layer_dims[-1]
        layer_dims = [*layer_dims, layer_dims[-1]]
        dim_pairs = zip(layer_dims[:-1], layer_dims[1:])

        self.to_patch_embedding = nn.Sequential(
            Rearrange("b c (h p1) (w p2) -> b (p1 p2 c) h w", p1=patch_size, p2=patch_size),
            nn.Conv2d(patch_dim, layer_dims[0], 1),
        )
        self.layers = nn.ModuleList([])
        for level, level_heads, (dim_in, dim_out), depth in zip(hierarchies, layer_heads, dim_pairs, block_repeats):
            self.layers.append(nn.ModuleList([
                Transformer(dim_in, seq_len, depth, level_heads, mlp_mult, dropout),
                Aggregate(dim_in, dim_out) if level != 0 else nn.Identity(),
            ]))
        self.mlp_head = nn.Sequential(
            LayerNorm(last_dim),
            Reduce("b c h w -> b c", "mean"),
            nn.Linear(last_dim, num_classes),
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
