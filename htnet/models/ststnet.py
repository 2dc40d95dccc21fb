"""STSTNet (Liong et al. 2019) as in its PyTorch reference (christy1206/STSTNet, main.py), whose saved weights
load strictly (its `out_channels` is `num_classes` here)."""
import torch
from torch import nn

from htnet.models.registry import dropout_rate, positive_int, register_model


@register_model("ststnet", input_kind="whole_face")
class STSTNet(nn.Module):
    """(B, in_channels, 28, 28) -> (B, num_classes): three 3x3 conv streams (3, 5, 8 filters, padding 2:
    28 -> 30), each ReLU, BatchNorm, MaxPool(3, 3, 1) (30 -> 10), dropout; concatenated, AvgPool 2x2
    (10 -> 5) and one Linear layer (16 * 5 * 5 = 400 inputs fix the size at 28x28)."""

    def __init__(self, in_channels=3, num_classes=3, dropout=0.5):
        super().__init__()
        in_channels = positive_int("ststnet", "in_channels", in_channels)
        num_classes = positive_int("ststnet", "num_classes", num_classes)
        dropout = dropout_rate("ststnet", "dropout", dropout)
        # created in the reference's order (the seeded init draws conv1, conv2, conv3's weights in turn)
        self.conv1, self.conv2, self.conv3 = (nn.Conv2d(in_channels, n, kernel_size=3, padding=2) for n in (3, 5, 8))
        self.relu = nn.ReLU()
        self.bn1, self.bn2, self.bn3 = (nn.BatchNorm2d(n) for n in (3, 5, 8))
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=3, padding=1)
        self.avgpool = nn.AvgPool2d(kernel_size=2, stride=2, padding=0)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(in_features=5 * 5 * 16, out_features=num_classes)

    def stream(self, x, conv, bn):
        return self.dropout(self.maxpool(bn(self.relu(conv(x)))))

    def forward(self, x):
        x = torch.cat([self.stream(x, conv, bn) for conv, bn in
                       ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3))], 1)
        return self.fc(self.avgpool(x).flatten(1))
