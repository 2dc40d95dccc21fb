"""STSTNet (Liong et al. 2019), as in its PyTorch reference: a shallow triple-stream network on
the whole-face optical-flow image (u, v, optical strain)."""
import torch
from torch import nn

from htnet.models import register_model


@register_model("ststnet", input_kind="whole_face")
class STSTNet(nn.Module):
    def __init__(self, in_channels=3, num_classes=3, dropout=0.5):
        super().__init__()
        # three 3x3 streams with 3, 5 and 8 filters; padding 2 makes 28x28 -> 30x30
        self.conv1 = nn.Conv2d(in_channels, 3, kernel_size=3, padding=2)
        self.conv2 = nn.Conv2d(in_channels, 5, kernel_size=3, padding=2)
        self.conv3 = nn.Conv2d(in_channels, 8, kernel_size=3, padding=2)
        self.relu = nn.ReLU()
        self.bn1 = nn.BatchNorm2d(3)
        self.bn2 = nn.BatchNorm2d(5)
        self.bn3 = nn.BatchNorm2d(8)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=3, padding=1)   # 30 -> 10
        self.avgpool = nn.AvgPool2d(kernel_size=2, stride=2, padding=0)   # 10 -> 5
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(in_features=5 * 5 * 16, out_features=num_classes)

    def forward(self, x):
        x1 = self.dropout(self.maxpool(self.bn1(self.relu(self.conv1(x)))))
        x2 = self.dropout(self.maxpool(self.bn2(self.relu(self.conv2(x)))))
        x3 = self.dropout(self.maxpool(self.bn3(self.relu(self.conv3(x)))))
        x = self.avgpool(torch.cat((x1, x2, x3), 1))
        return self.fc(x.flatten(1))
