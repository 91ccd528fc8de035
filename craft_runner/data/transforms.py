"""Image transforms derived from a model's timm data config.

Two families:

- full-size photographs (Flowers, Cars, Pets, Aircraft, Food, ImageNet): timm's own evaluation
  transform (resize to ``size / crop_pct``, centre crop) and a light training one (random resized
  crop + horizontal flip, no colour jitter);
- small images stored at a fixed size (CIFAR, 32x32): for training a random crop with 4-pixel zero
  padding plus a flip at the stored size, then (train and eval) a resize to the model's size without
  cropping. These run on uint8 tensors, so the same operations serve the per-image loader path and the
  batched on-device path (:class:`BatchPadCropFlip`, :class:`BatchResizeNormalize`), and both give the
  same evaluation tensors. Held on the device, the images stay at 32x32 and are resized per batch there:
  a ViT's 224x224 copy of CIFAR would take 49x the memory and minutes of CPU time to make.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# CIFAR-10 training-set statistics (also the default data config of craft_runner.models.cifar's models).
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)

# Keys a resolved data config always has (timm.data.resolve_data_config gives the same keys).
_DEFAULTS = {"interpolation": "bilinear", "crop_pct": 0.875, "crop_mode": "center"}


def resolve_data_config(data_config: Optional[dict], size_override: Optional[int], fallback_size: int,
                        mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> dict:
    """The model's data config with gaps filled: ``size_override`` (dataset.img_size) wins over the model's
    input size, which wins over ``fallback_size``; ``mean``/``std`` only fill a config without them."""
    dc = dict(data_config or {})
    if size_override:
        dc["input_size"] = (3, int(size_override), int(size_override))
    dc.setdefault("input_size", (3, int(fallback_size), int(fallback_size)))
    dc["input_size"] = tuple(int(v) for v in dc["input_size"])
    dc.setdefault("mean", tuple(mean))
    dc.setdefault("std", tuple(std))
    for k, v in _DEFAULTS.items():
        if dc.get(k) is None:
            dc[k] = v
    return dc


def image_hw(dc: dict) -> tuple[int, int]:
    return int(dc["input_size"][1]), int(dc["input_size"][2])


def _tensor_interp(name: str):
    """Tensor resizing knows nearest/bilinear/bicubic only; anything else ('random', 'lanczos') -> bilinear."""
    from torchvision.transforms import InterpolationMode

    modes = {"nearest": InterpolationMode.NEAREST, "bilinear": InterpolationMode.BILINEAR,
             "bicubic": InterpolationMode.BICUBIC}
    return modes.get(name, InterpolationMode.BILINEAR)


# ------------------------------------------------------------------------------------ full-size photographs


def image_eval_transform(dc: dict):
    """timm's evaluation transform for this model: resize to size / crop_pct, centre crop, normalise."""
    from timm.data import create_transform

    return create_transform(dc["input_size"], is_training=False, interpolation=dc["interpolation"],
                            mean=dc["mean"], std=dc["std"], crop_pct=dc["crop_pct"], crop_mode=dc["crop_mode"])


def image_train_transform(dc: dict):
    """Light augmentation: random resized crop (timm's default scale 0.08-1) and horizontal flip."""
    from timm.data import create_transform

    return create_transform(dc["input_size"], is_training=True, interpolation=dc["interpolation"],
                            mean=dc["mean"], std=dc["std"], hflip=0.5, color_jitter=None)


# ------------------------------------------------------------------------------------------- small images


def pad_for(hw: tuple[int, int]) -> int:
    """CIFAR's 4-pixel padding at 32x32, scaled with the image."""
    return max(1, round(4 * min(hw) / 32))


class ToFloatNormalize:
    """uint8 (or [0, 1] float) images, one or a batch, to normalised float32 on the same device."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        if self.mean.device != x.device:  # kept on the batch's device after the first call
            self.mean, self.std = self.mean.to(x.device), self.std.to(x.device)
        return (x - self.mean) / self.std

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


class ResizeUint8:
    """Resize a uint8 CHW image or NCHW batch (torchvision's tensor resize, antialiased); a no-op at that size."""

    def __init__(self, hw: tuple[int, int], interpolation: str):
        self.hw, self.interpolation = tuple(hw), interpolation

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) == self.hw:
            return x
        from torchvision.transforms.functional import resize

        return resize(x, list(self.hw), interpolation=_tensor_interp(self.interpolation), antialias=True)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(hw={self.hw}, interpolation={self.interpolation!r})"


class BatchResizeNormalize:
    """Stored uint8 images (a batch, on its device) to model input: resize, then normalise."""

    def __init__(self, dc: dict):
        self.resize = ResizeUint8(image_hw(dc), dc["interpolation"])
        self.normalize = ToFloatNormalize(dc["mean"], dc["std"])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalize(self.resize(x))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.resize!r}, {self.normalize!r})"


def small_image_transform(dc: dict, train: bool, stored_hw: tuple[int, int] = (32, 32)):
    """PIL image -> uint8 tensor -> [pad-crop + flip at the stored size when training] -> resize -> normalise."""
    from torchvision import transforms as T

    ops = [T.PILToTensor()]
    if train:
        ops += [T.RandomCrop(stored_hw, padding=pad_for(stored_hw)), T.RandomHorizontalFlip()]
    ops += [ResizeUint8(image_hw(dc), dc["interpolation"]), ToFloatNormalize(dc["mean"], dc["std"])]
    return T.Compose(ops)


class BatchPadCropFlip:
    """Batched random crop with padding (zeros, or ``fill``) plus horizontal flip (``flip=False``: crop only), for
    images held on the device.

    The same as torchvision's RandomCrop(padding=pad) then RandomHorizontalFlip per image, but one gather
    for the whole batch; the offsets and flips come from the loader's generator, so a seed fixes them.
    """

    def __init__(self, pad: int, flip: bool = True, fill: float = 0.0):
        self.pad = int(pad)
        self.flip = flip
        self.fill = fill  # the padding value: the background of the stored images

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        b, _, h, w = x.shape
        p = self.pad
        # Drawn on the CPU generator, so the stream does not depend on the device.
        dy, dx = torch.randint(0, 2 * p + 1, (2, b), generator=generator)
        flip = torch.rand(b, generator=generator) < 0.5
        flip &= self.flip
        cols = torch.arange(w)
        cols = dx[:, None] + torch.where(flip[:, None], cols.flip(0), cols)  # (b, w)
        rows = dy[:, None] + torch.arange(h)  # (b, h)
        dev = x.device
        xp = F.pad(x, (p, p, p, p), value=self.fill)
        out = xp[torch.arange(b, device=dev)[:, None, None], :, rows.to(dev)[:, :, None], cols.to(dev)[:, None, :]]
        return out.permute(0, 3, 1, 2).contiguous()  # advanced indexing put channels last

    def __repr__(self) -> str:
        return f"{type(self).__name__}(pad={self.pad}, flip={self.flip}, fill={self.fill})"
