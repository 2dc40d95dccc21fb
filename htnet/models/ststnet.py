"""STSTNet (Liong et al. 2019), as in its PyTorch reference (christy1206/STSTNet, main.py): a
shallow triple-stream network on the whole-face optical-flow image (u, v, optical strain).

Three 3x3 convolution streams with 3, 5 and 8 filters (padding 2: 28x28 -> 30x30), each followed
by ReLU, BatchNorm, MaxPool2d(3, stride 3, padding 1) (30 -> 10) and dropout; the 16 maps are
concatenated, AvgPool2d(2, stride 2) (10 -> 5), flattened (16 * 5 * 5 = 400) and classified by one
Linear layer. Parameter names are the reference's, so its saved per-subject weights load with
strict=True. The reference calls the class count `out_channels`; here it is `num_classes`.
"""
import torch
from torch import nn

from htnet.models.registry import dropout_rate, positive_int, register_model


@register_model("ststnet", input_kind="whole_face")
class STSTNet(nn.Module):
    """Input (B, in_channels, 28, 28), output (B, num_classes) logits (the Linear layer's 400
    inputs fix the spatial size at 28x28)."""

    def __init__(self, in_channels=3, num_classes=3, dropout=0.5):
        super().__init__()
        in_channels = positive_int("ststnet", "in_channels", in_channels)
        num_classes = positive_int("ststnet", "num_classes", num_classes)
        dropout = dropout_rate("ststnet", "dropout", dropout)
        self.conv1 = nn.Conv2d(in_channels, out_channels=3, kernel_size=3, padding=2)
        self.conv2 = nn.Conv2d(in_channels, out_channels=5, kernel_size=3, padding=2)
        self.conv3 = nn.Conv2d(in_channels, out_channels=8, kernel_size=3, padding=2)
        self.relu = nn.ReLU()
        self.bn1 = nn.BatchNorm2d(3)
        self.bn2 = nn.BatchNorm2d(5)
        self.bn3 = nn.BatchNorm2d(8)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=3, padding=1)   # 30 -> 10
        self.avgpool = nn.AvgPool2d(kernel_size=2, stride=2, padding=0)   # 10 -> 5
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(in_features=5 * 5 * 16, out_features=num_classes)

    def stream(self, x, conv, bn):
        return self.dropout(self.maxpool(bn(self.relu(conv(x)))))

    def forward(self, x):
        x1 = self.stream(x, self.conv1, self.bn1)
        x2 = self.stream(x, self.conv2, self.bn2)
        x3 = self.stream(x, self.conv3, self.bn3)
        x = self.avgpool(torch.cat((x1, x2, x3), 1))
        return self.fc(x.flatten(1))
