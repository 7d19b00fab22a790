"""The ConvNet reference of the results: torchvision's resnet18, from random weights, behind the few methods
train.py and eval.py call on a model. Nothing of the network is written here: `ResNet18(config)` is
`torchvision.models.resnet18(num_classes=config.num_classes)`, module for module."""
import dataclasses

import torch.nn as nn
from torchvision.models.resnet import BasicBlock, ResNet


class ResNet18(ResNet):
    def __init__(self, config):
        if config.attn != "resnet18":
            raise ValueError(f"ResNet18 needs attn='resnet18', got {config.attn!r}")
        super().__init__(BasicBlock, [2, 2, 2, 2], num_classes=config.num_classes)   # what resnet18() builds
        self.config = config

    def param_groups(self, weight_decay):
        """AdamW groups as for the transformers: decay only conv kernels and the head's matrix, not the
        BatchNorm weights or the biases."""
        decay = [p for p in self.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.dim() < 2]
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def reset_classifier(self, num_classes):
        """A new, freshly initialised head (torchvision's Linear init) for num_classes classes, on the old head's
        device and dtype."""
        old = self.fc.weight
        self.fc = nn.Linear(self.fc.in_features, num_classes, device=old.device, dtype=old.dtype)
        self.config = dataclasses.replace(self.config, num_classes=num_classes)
