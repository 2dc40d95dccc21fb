"""Dual-Inception (Zhou, Mao, Xue: "Dual-Inception Network for Cross-Database Micro-Expression Recognition",
FG 2019, MEGC2019), as its authors' released Keras code builds it (xly135846/MEGC2019, dual_inception.py).

The paper: the horizontal and the vertical components of the TV-L1 optical flow between onset and mid-position frame,
each in its own inception stream; the streams concatenated and classified. The code: per stream (input 28x28x3, the
flow component read as a 3-channel image) two inception blocks (branches 1x1; 1x1 -> 3x3; 1x1 -> 5x5; 3x3
max-pool stride 1 -> 1x1; ReLU after every convolution, 'same' padding) of 6 then 16 filters per branch, each
followed by 2x2 max-pooling (28 -> 14 -> 7); flattened, concatenated, FC 1024 with ReLU, FC to the classes; no
dropout (6.45M parameters at 3 classes). Ours differs: each stream reads one channel of our 28x28x3 image (u, and v;
the optical strain is unused), and the weights start from torch's default initialisation (Keras: Glorot uniform)."""
import torch
from einops.layers.torch import Rearrange
from torch import nn

from htnet.models.offapexnet import flow_streams
from htnet.models.registry import dropout_rate, positive_int, register_model


class Inception(nn.Module):
    """GoogLeNet's block, `width` filters per branch: (B, cin, H, W) -> (B, 4 * width, H, W)."""

    def __init__(self, cin, width):
        super().__init__()

        def conv(c, k):
            return [nn.Conv2d(c, width, k, padding=k // 2), nn.ReLU()]
        self.branches = nn.ModuleList([nn.Sequential(*conv(cin, 1)),
                                       nn.Sequential(*conv(cin, 1), *conv(width, 3)),
                                       nn.Sequential(*conv(cin, 1), *conv(width, 5)),
                                       nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), *conv(cin, 1))])

    def forward(self, x):
        return torch.cat([branch(x) for branch in self.branches], 1)


@register_model("dual_inception", input_kind="whole_face")
class DualInception(nn.Module):
    """(B, 3, 28, 28) -> (B, num_classes): per stream Inception(6) -> pool 2 -> Inception(16) -> pool 2, 64 x 7 x 7;
    both streams' 6272 features -> FC hidden -> FC num_classes."""

    def __init__(self, num_classes=3, dropout=0.0, hidden=1024):
        super().__init__()
        num_classes = positive_int("dual_inception", "num_classes", num_classes)
        hidden = positive_int("dual_inception", "hidden", hidden)
        dropout = dropout_rate("dual_inception", "dropout", dropout)
        self.u_stream, self.v_stream = (nn.Sequential(Inception(1, 6), nn.MaxPool2d(2), Inception(24, 16),
                                                      nn.MaxPool2d(2), Rearrange("b c h w -> b (c h w)"))
                                        for _ in range(2))
        self.classifier = nn.Sequential(nn.Linear(2 * 64 * 7 * 7, hidden), nn.ReLU(), nn.Dropout(dropout),
                                        nn.Linear(hidden, num_classes))

    def forward(self, x):
        u, v = flow_streams(x)
        return self.classifier(torch.cat([self.u_stream(u), self.v_stream(v)], 1))
