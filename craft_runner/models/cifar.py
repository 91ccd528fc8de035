"""Small CIFAR-style models (32x32 input) registered in timm.

Importing this module registers ``resnet20``, ``mobilenetv1_cifar`` and ``mixer_s_cifar`` so that
``timm.create_model(name, num_classes=...)`` builds them. No weights are published for them:
``pretrained=True`` works only with a local file, passed as
``pretrained_cfg_overlay=dict(file=path)`` (what :func:`craft_runner.models.create_model` does).

Every activation is an ``nn.Module`` attribute (never a functional call) and the forward passes read
their sub-modules by name, so :mod:`craft_runner.models.snt` can move and replace them.

Parameter counts (10 classes, 3 input channels), checked in ``tests/test_models.py``:

- ``resnet20``: 272,474 (0.27 M). The original paper's option-A (zero-padding) shortcuts give 269,722;
  the 1x1 conv + BN projections used here add 2,752.
- ``mobilenetv1_cifar``: 3,217,226 (3.2 M).
- ``mixer_s_cifar``: 1,132,170 (1.1 M).
"""

from __future__ import annotations

from typing import Optional

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from craft_runner.data.transforms import CIFAR_MEAN, CIFAR_STD
from craft_runner.schema import ConfigError

__all__ = ["BasicBlock", "ResNetCifar", "DepthwiseSeparable", "MobileNetV1Cifar", "MixerMlp", "MixerBlock",
           "MlpMixerCifar", "CIFAR_MEAN", "CIFAR_STD"]


def _cfg(**kwargs) -> dict:
    return {
        "url": "",
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "pool_size": None,
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "fixed_input_size": False,
        "mean": CIFAR_MEAN,
        "std": CIFAR_STD,
        "first_conv": "conv1",
        "classifier": "fc",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "resnet20": _cfg(pool_size=(8, 8)),
    "mobilenetv1_cifar": _cfg(pool_size=(2, 2)),
    "mixer_s_cifar": _cfg(first_conv="stem.proj", classifier="head", fixed_input_size=True),
})


# ----------------------------------------------------------------------------------------------- ResNet-20


class BasicBlock(nn.Module):
    """conv3x3 -> BN -> act1 -> conv3x3 -> BN, plus shortcut, then act2 after the addition."""

    expansion = 1

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, act_layer=nn.ReLU):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.act1 = act_layer()
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        if stride != 1 or in_chs != out_chs:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False), nn.BatchNorm2d(out_chs))
        else:
            self.shortcut = nn.Identity()
        self.act2 = act_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.shortcut(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        return self.act2(x + shortcut)


class _PooledCNN(nn.Module):
    """timm's classifier interface for the CIFAR CNNs: global pool, dropout, ``fc``."""

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.global_pool(x))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class ResNetCifar(_PooledCNN):
    """CIFAR ResNet (He et al. 2016, section 4.2): depth 6n+2, widths 16/32/64.

    ``final_act`` sits between the last stage and the pooling; it is an ``nn.Identity`` here and
    becomes an activation after the SNT pre-activation transform (see :mod:`craft_runner.models.snt`).
    """

    def __init__(self, depth: int = 20, num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.0,
                 widths=(16, 32, 64), global_pool: str = "avg"):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"ResNetCifar depth must be 6n+2, got {depth}")
        if global_pool != "avg":
            raise ValueError(f"ResNetCifar supports global_pool='avg' only, got {global_pool!r}")
        n = (depth - 2) // 6
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.act1 = nn.ReLU()
        in_chs = widths[0]
        self.feature_info = [dict(num_chs=widths[0], reduction=1, module="act1")]
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(in_chs, w, stride if j == 0 else 1))
                in_chs = w
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=w, reduction=2 ** i, module=f"layer{i + 1}"))
        self.final_act = nn.Identity()
        self.num_features = self.head_hidden_size = in_chs
        self.global_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_chs, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def stages(self):
        return [self.layer1, self.layer2, self.layer3]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.final_act(x)



# ------------------------------------------------------------------------------------------ MobileNet-V1


class DepthwiseSeparable(nn.Module):
    """depthwise conv3x3 -> BN -> act1 -> pointwise conv1x1 -> BN -> act2 (Howard et al. 2017)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, act_layer=nn.ReLU):
        super().__init__()
        self.conv_dw = nn.Conv2d(in_chs, in_chs, 3, stride=stride, padding=1, groups=in_chs, bias=False)
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.act1 = act_layer()
        self.conv_pw = nn.Conv2d(in_chs, out_chs, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.act2 = act_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv_dw(x)))
        return self.act2(self.bn2(self.conv_pw(x)))


# (out_chs, stride) of the 13 depthwise-separable blocks. ImageNet MobileNet-V1 has strides
# 1,2,1,2,1,2,1x6,2,1 after a stride-2 stem; on 32x32 input the stem keeps stride 1 and the first
# stride-2 block too becomes stride 1, as in the usual CIFAR port, so 32 -> 16 -> 8 -> 4 -> 2.
MOBILENETV1_CIFAR_CFG = ((64, 1), (128, 1), (128, 1), (256, 2), (256, 1), (512, 2),
                         (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))


class MobileNetV1Cifar(_PooledCNN):
    """MobileNet-V1 (width 1.0) for 32x32 input: stem conv3x3/32 stride 1, 13 depthwise-separable blocks."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.0, stem_chs: int = 32,
                 cfg=MOBILENETV1_CIFAR_CFG, global_pool: str = "avg"):
        super().__init__()
        if global_pool != "avg":
            raise ValueError(f"MobileNetV1Cifar supports global_pool='avg' only, got {global_pool!r}")
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.conv1 = nn.Conv2d(in_chans, stem_chs, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_chs)
        self.act1 = nn.ReLU()
        blocks, in_chs, red = [], stem_chs, 1
        self.feature_info = []
        for i, (out_chs, stride) in enumerate(cfg):
            blocks.append(DepthwiseSeparable(in_chs, out_chs, stride))
            in_chs, red = out_chs, red * stride
            self.feature_info.append(dict(num_chs=out_chs, reduction=red, module=f"blocks.{i}"))
        self.blocks = nn.Sequential(*blocks)
        self.final_act = nn.Identity()
        self.num_features = self.head_hidden_size = in_chs
        self.global_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_chs, num_classes) if num_classes > 0 else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        return self.final_act(self.blocks(x))



# -------------------------------------------------------------------------------------------- MLP-Mixer


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens (B, N, C), as a strided conv."""

    def __init__(self, img_size, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        # timm passes img_size as (H, W) from the pretrained cfg's input_size.
        if isinstance(img_size, (tuple, list)):
            if img_size[0] != img_size[1]:
                raise ValueError(f"MLP-Mixer here takes square input only, got img_size={tuple(img_size)}")
            img_size = img_size[0]
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.img_size = img_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"MLP-Mixer expects {self.img_size}x{self.img_size} input, got {tuple(x.shape[-2:])}")
        return self.proj(x).flatten(2).transpose(1, 2)


class MixerMlp(nn.Module):
    """fc1 -> act -> drop -> fc2 -> drop on the last dim."""

    def __init__(self, in_features: int, hidden_features: int, act_layer=nn.GELU, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop1(self.act(self.fc1(x)))
        return self.drop2(self.fc2(x))


class MixerBlock(nn.Module):
    """Token mixing then channel mixing, each ``x + mlp(act_pre(norm(x)))`` (Tolstikhin et al. 2021).

    ``act_pre1`` / ``act_pre2`` act on (B, N, C) tokens right after each norm; they are ``nn.Identity``
    here (plain Mixer) and become activations after the SNT pre-activation transform.
    """

    def __init__(self, dim: int, seq_len: int, tokens_dim: int, channels_dim: int, drop: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.act_pre1 = nn.Identity()
        self.mlp_tokens = MixerMlp(seq_len, tokens_dim, drop=drop)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.act_pre2 = nn.Identity()
        self.mlp_channels = MixerMlp(dim, channels_dim, drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Token mixing acts on (B, C, N): the MLP's last dim is the token axis.
        x = x + self.mlp_tokens(self.act_pre1(self.norm1(x)).transpose(1, 2)).transpose(1, 2)
        return x + self.mlp_channels(self.act_pre2(self.norm2(x)))


class MlpMixerCifar(nn.Module):
    """MLP-Mixer-S of the SNT paper: 32x32 input, 4x4 patches (64 tokens), hidden 128, D_S 64, D_C 512, 8 layers."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.0, img_size: int = 32,
                 patch_size: int = 4, embed_dim: int = 128, depth: int = 8, tokens_dim: int = 64,
                 channels_dim: int = 512, proj_drop_rate: float = 0.0, global_pool: str = "avg"):
        super().__init__()
        if global_pool != "avg":
            raise ValueError(f"MlpMixerCifar supports global_pool='avg' only, got {global_pool!r}")
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.stem = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        seq_len = self.stem.num_patches
        self.blocks = nn.Sequential(*[
            MixerBlock(embed_dim, seq_len, tokens_dim, channels_dim, drop=proj_drop_rate) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [dict(num_chs=embed_dim, reduction=patch_size, module=f"blocks.{i}") for i in range(depth)]
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                # timm's Mixer init: zero head, xavier + tiny-normal bias elsewhere.
                if name == "head":
                    nn.init.zeros_(m.weight)
                    nn.init.zeros_(m.bias)
                else:
                    nn.init.xavier_uniform_(m.weight)
                    nn.init.normal_(m.bias, std=1e-6)

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(self.stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(x.mean(dim=1))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ---------------------------------------------------------------------------------------------- registry


def _create(cls, variant: str, pretrained: bool, **kwargs) -> nn.Module:
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    if pretrained and not overlay.get("file"):
        # Nothing is published for these models; timm would silently fall back to random init.
        raise ConfigError(
            f"model.pretrained=true for {variant!r}: no weights are published for it; "
            f"set model.checkpoint_path=/path/to/weights or model.pretrained=false")
    # build_model_with_cfg takes feature_cfg; feature_info is set by the classes themselves.
    return build_model_with_cfg(cls, variant, pretrained, feature_cfg=dict(flatten_sequential=True), **kwargs)


@register_model
def resnet20(pretrained: bool = False, **kwargs) -> ResNetCifar:
    """ResNet-20 for CIFAR: 3 stages x 3 BasicBlocks, 16/32/64 channels; 272,474 parameters at 10 classes."""
    return _create(ResNetCifar, "resnet20", pretrained, **dict(dict(depth=20), **kwargs))


@register_model
def mobilenetv1_cifar(pretrained: bool = False, **kwargs) -> MobileNetV1Cifar:
    """MobileNet-V1 (width 1.0) for 32x32 input; 3,217,226 parameters at 10 classes."""
    return _create(MobileNetV1Cifar, "mobilenetv1_cifar", pretrained, **kwargs)


@register_model
def mixer_s_cifar(pretrained: bool = False, **kwargs) -> MlpMixerCifar:
    """MLP-Mixer-S of the SNT paper (4x4 patches, 64 tokens, C=128, D_S=64, D_C=512, 8 layers); 1,132,170
    parameters at 10 classes."""
    return _create(MlpMixerCifar, "mixer_s_cifar", pretrained, **kwargs)
