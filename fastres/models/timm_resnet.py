"""timm's ResNet family (ResNet, ResNeXt, SE-ResNeXt, Res2Net, ...) with the fastres stem: the
class `convert()` re-classes a timm ResNet to (in its own module, so fastres imports timm only
when a timm model is converted). A deep stem (several convs, the -d variants) runs unchanged."""
from __future__ import annotations

from typing import Optional

import torch
from timm.models import resnet as timm_resnet
from timm.models._manipulate import checkpoint_seq
from torch import Tensor, nn

from fastres.models.resnet import stem
from fastres.nn import inference as _inference
from fastres.nn.norm_act import check_input


class TimmResNet(timm_resnet.ResNet):
    backend: Optional[str] = None

    def forward_features(self, x: Tensor) -> Tensor:
        if isinstance(self.conv1, nn.Conv2d):
            check_input(self, x, self.conv1.in_channels)
            x = stem(x, self.conv1, self.bn1, self.maxpool, self.backend)
            owned = not _inference.hooked(self.maxpool)
        else:  # a deep stem (several convs) runs as timm's modules
            x, owned = self.maxpool(self.act1(self.bn1(self.conv1(x)))), False
        layers = [self.layer1, self.layer2, self.layer3, self.layer4]
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(layers, x, flatten=True)
        for layer in layers:
            x, owned = _inference.run_blocks(layer, x, owned)
        return x
