"""OFF-ApexNet (Gan, Liong, Yau, Huang, Tan: "OFF-ApexNet on micro-expression recognition system", Signal
Processing: Image Communication 74, 2019; arXiv 1805.08699).

The paper: the horizontal and the vertical optical flow between onset and apex frame, each 28x28, in two streams of
two convolution + max-pooling layers; the streams' features concatenated, two fully connected layers, a softmax.
The STSTNet paper (Liong et al., FG 2019, Table V), which reran it on the MEGC2019 composite: depth 5, 2.77M
parameters, input 28x28x2. The layer sizes here are those of the PyTorch reimplementation that matches that depth
and size (ECNU-Cross-Innovation-Lab/PRICAI2021-Off-TANet, models/off_apexnet.py): 5x5 convolutions ('same') with
6 and 16 filters, 2x2 max-pooling, fully connected 1024 and 1024 with ReLU and dropout 0.5 (2.66M parameters at 3
classes). Ours differs: a ReLU after each convolution (that reimplementation has none; the MEB toolkit's version
has one), and the input is our 28x28x3 image, of which the u and v channels feed the two streams and the optical
strain is unused."""
import torch
from einops.layers.torch import Rearrange
from torch import nn

from htnet.models.registry import dropout_rate, positive_int, register_model

U, V = 2, 1   # the flow channels of our images (cv2's order: 0 strain, 1 v, 2 u; docs/design.md)


def flow_streams(x):
    """(B, 3, H, W) pixels 0..255 -> the u and v maps scaled to 0..1 as the references feed them, each (B, 1, H, W)
    (no normalisation layer absorbs the scale here, unlike STSTNet's BatchNorm)."""
    return x[:, U:U + 1] / 255, x[:, V:V + 1] / 255


@register_model("offapexnet", input_kind="whole_face")
class OFFApexNet(nn.Module):
    """(B, 3, 28, 28) -> (B, num_classes): per stream conv 5x5 (6) -> pool 2 (14x14) -> conv 5x5 (16) -> pool 2
    (7x7); 2 x 16 x 7 x 7 = 1568 features -> FC hidden -> FC hidden -> FC num_classes."""

    def __init__(self, num_classes=3, dropout=0.5, hidden=1024):
        super().__init__()
        num_classes = positive_int("offapexnet", "num_classes", num_classes)
        hidden = positive_int("offapexnet", "hidden", hidden)
        dropout = dropout_rate("offapexnet", "dropout", dropout)
        self.u_stream, self.v_stream = (self.stream() for _ in range(2))
        self.classifier = nn.Sequential(
            nn.Linear(2 * 16 * 7 * 7, hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, num_classes))

    @staticmethod
    def stream():
        return nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(6, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                             Rearrange("b c h w -> b (c h w)"))

    def forward(self, x):
        u, v = flow_streams(x)
        return self.classifier(torch.cat([self.u_stream(u), self.v_stream(v)], 1))
