"""SNT network transformations (Heo et al., section 4): pre-activation reorder and RPReLU.

:func:`apply_snt` rewrites a built model in place. Supported models and exactly what changes:

**ResNet** (``resnet20`` here, timm's ``resnet18`` and any timm ``ResNet`` made of plain
``BasicBlock``s with a single-conv stem). Each block ``conv1-bn1-act1-conv2-bn2 (+shortcut) -> act2``
becomes a :class:`PreActBasicBlock`::

    out = bn2(conv2(act1(bn1(conv1(act_pre(x)))))) + shortcut(x)

i.e. the activation after the addition moves to the start of the residual branch, after the split,
so every addition joins two linear paths (section 4.1). The stem (conv-BN-act) is unchanged; one
activation (``final_act``; for timm, appended to ``layer4``) is added after the last stage so that
the pooled features fed to the classifier are rectified as in the base network (this is also the
final BN-ReLU of He et al.'s pre-activation ResNet). Conv/BN weights are the same objects, and the
state_dict keys of every existing weight are unchanged.

**MobileNet-V1** (``mobilenetv1_cifar``). It has no residual additions, so the paper's reason for
the reorder does not apply; each depthwise-separable unit is still rewritten as
``act_pre -> conv_dw -> bn1 -> act1 -> conv_pw -> bn2`` (:class:`PreActDepthwiseSeparable`), with
``act_pre`` of the first unit an identity (the stem already ends in its activation; an activation on
the raw image would not be meaningful) and ``final_act`` added before pooling. In a plain chain this
only relabels which unit owns each activation: the network computes the same function as the base
one (``tests/test_snt.py`` checks this), with ReLU and with RPReLU. For MobileNet-V1 the SNT effect
therefore comes from RPReLU.

**MLP-Mixer** (``mixer_s_cifar``). Its residual stream is never activated and each branch already
ends in a linear layer (``x + fc2(GELU(fc1(LN(x))))``). The transform *adds* an activation at the
start of each branch, after the split and its LayerNorm::

    x = x + mlp_tokens(act_pre1(norm1(x)))      # token mixing
    x = x + mlp_channels(act_pre2(norm2(x)))    # channel mixing

keeping each MLP's own hidden activation (moving it instead would collapse ``fc2 . fc1`` into one
linear map). This follows the norm -> activation -> weight order of pre-activation ResNets. The
paper's Figure 4 is not available in text form, so this is our reading of it.

**RPReLU** (section 4.2) replaces every activation of the network (ReLU; for the Mixer, GELU, which
is piecewise-linearised by RPReLU exactly as the paper's function prescribes) by an
:class:`RPReLU` with one ``(gamma, zeta, beta)`` triple per channel: dim 1 of NCHW feature maps,
the last dim of token tensors (for the Mixer: the 128 embedding channels for ``act_pre*``, the
D_S = 64 hidden units of token mixing and the D_C = 512 hidden units of channel mixing).

Any other model raises :class:`~craft_runner.config.ConfigError`. With ``preact=False`` and
``rprelu=False`` the model is returned untouched, whatever it is.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from craft_runner.models import rprelu_cpu
from craft_runner.models.cifar import BasicBlock as CifarBasicBlock
from craft_runner.models.cifar import DepthwiseSeparable, MlpMixerCifar, MobileNetV1Cifar, ResNetCifar
from craft_runner.schema import ConfigError

_logger = logging.getLogger(__name__)

__all__ = ["RPReLU", "PreActBasicBlock", "PreActDepthwiseSeparable", "apply_snt", "SNT_SUPPORTED"]

SNT_SUPPORTED = ("resnet20", "resnet18 (timm ResNet of BasicBlocks)", "mobilenetv1_cifar", "mixer_s_cifar")


def _channel_shape(x: torch.Tensor) -> tuple[int, ...]:
    """View shape of a per-channel parameter: channel = dim 1 of a 4-D tensor, else the last dim."""
    return (1, -1, 1, 1) if x.ndim == 4 else (-1,)


def _per_channel_sums(ts: list[torch.Tensor]) -> torch.Tensor:
    """(len(ts), C): each tensor summed over all but its channel dim, first within each sample (the
    generated reduction then runs in parallel over the samples, and faster than one long sum)."""
    x = ts[0]
    # parameter gradients accumulate in float32 also for bf16 activations, and in float64 for float64 ones
    f32 = torch.promote_types(x.dtype, torch.float32)
    if x.ndim == 4:
        parts = [t.sum((2, 3), dtype=f32) for t in ts]  # (N, C)
    elif x.ndim > 2:
        parts = [t.sum(tuple(range(1, x.ndim - 1)), dtype=f32) for t in ts]  # (B, C)
    else:
        parts = [t.to(f32) for t in ts]
    return torch.stack(parts).sum(1)


def rprelu(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, zeta: torch.Tensor) -> torch.Tensor:
    """SNT eq. (1) in plain, twice differentiable tensor ops."""
    shape = _channel_shape(x)
    y = x - gamma.view(shape)
    return torch.where(y > 0, y, beta.view(shape) * y) + zeta.view(shape)


def _rprelu_backward(g: torch.Tensor, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor):
    """Gradients of eq. (1) for the output gradient g: with y = x − γ, n = [y ≤ 0] and s = 1 − n + βn,
    ∂x = g·s, ∂ζ = Σ g, ∂β = Σ g·y·n and ∂γ = −Σ g·s = −(Σ g − (1 − β) Σ g·n) (sums over all but the
    channel dim)."""
    shape = _channel_shape(x)
    y = x - gamma.view(shape)
    pos = y > 0
    dx = torch.where(pos, g, beta.view(shape) * g)
    g_neg = torch.where(pos, torch.zeros_like(g), g)
    s_g, s_neg, s_negy = _per_channel_sums([g, g_neg, g_neg * y])
    return dx, (1 - beta) * s_neg - s_g, s_negy, s_g


# torch.compile'd forward and backward, made on first use; "off" once compiling failed in this process
_compiled: dict = {}


def _kernel(name: str, fn, *args):
    """``fn(*args)`` through its compiled version (one generated kernel: C++ on CPU, Triton on CUDA), or
    eagerly when torch.compile cannot work here (no C++ compiler, no Triton): same values, more passes."""
    if not _compiled.get("off"):
        try:
            if name not in _compiled:
                # dynamic: one graph for every batch and spatial size, no recompilation per shape
                _compiled[name] = torch.compile(fn, dynamic=True, fullgraph=True)
            return _compiled[name](*args)
        except Exception as e:  # noqa: BLE001 - any compiler failure: eager for the rest of the process
            _compiled["off"] = True
            msg = str(e).splitlines()[0] if str(e) else ""
            _logger.warning("RPReLU: torch.compile failed (%s: %s); using unfused kernels (slower training)",
                            type(e).__name__, msg)
    return fn(*args)


class _FusedRPReLU(torch.autograd.Function):
    """Eq. (1) with a generated forward kernel (one pass, as ReLU) and a generated backward (∂x in one
    pass, the three parameter gradients in per-sample partial sums, in parallel over the samples).

    Autograd through :func:`rprelu` doubled a ResNet-20 training step on CPU: ``torch.where`` is a slow
    CPU kernel (measured ~70x a ReLU on a channels_last tensor, ~30x on NCHW), run twice forward and
    twice backward, plus broadcast multiplications and three reductions, each allocating a full-size
    tensor. Saves the input x (the parameter gradients need x − γ), one tensor per layer more than ReLU.
    Once differentiable: Hessian-vector products go through :func:`rprelu` (see :class:`RPReLU`).
    """

    @staticmethod
    def forward(ctx, x, gamma, beta, zeta):
        ctx.save_for_backward(x, gamma, beta)
        ctx.native = rprelu_cpu.usable(x)
        if ctx.native:  # a channels-last float32 CPU tensor: the C kernels, one pass each way
            return rprelu_cpu.forward(x, gamma.detach(), beta.detach(), zeta.detach())
        # detached: torch.compile takes a Parameter's shape as static, which would fix the channel count
        # and compile once per layer width instead of once. In x's dtype: float32 parameters would promote a
        # bf16 activation (autocast) to float32, twice the memory and not what the next layer computes in.
        d = x.dtype
        return _kernel("forward", rprelu, x, gamma.detach().to(d), beta.detach().to(d), zeta.detach().to(d))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, gamma, beta = ctx.saved_tensors
        if ctx.native:
            return rprelu_cpu.backward(g, x, gamma.detach(), beta.detach())
        # ∂x in x's dtype; the parameter gradients summed in float32 and returned in the parameters' dtype
        dx, dgamma, dbeta, dzeta = _kernel("backward", _rprelu_backward, g.to(x.dtype), x, gamma.detach().to(x.dtype),
                                           beta.detach().to(x.dtype))
        return dx, dgamma.to(gamma.dtype), dbeta.to(beta.dtype), dzeta.to(gamma.dtype)


class RPReLU(nn.Module):
    """PReLU sandwiched between learnable shifts (SNT eq. 1, after ReActNet's RPReLU), per channel i::

        f(x_i) = x_i - gamma_i + zeta_i          if x_i > gamma_i
                 beta_i * (x_i - gamma_i) + zeta_i  otherwise

    The channel is dim 1 of a 4-D (N, C, H, W) tensor and the last dim of any other tensor (tokens
    (B, N, C), or (B, C)). ``gamma`` and ``zeta`` start at 0 and ``beta`` at 0.25 (PReLU's default), so
    a fresh RPReLU is a PReLU. All three are 1-D parameters: the project's optimizer factory puts no
    weight decay on parameters with ``ndim <= 1``, which is how they are kept free of weight decay.

    With ``fused`` (default) a module in training mode, with gradients on, computes the same function
    with the fused kernels of :class:`_FusedRPReLU`: on the CPU for a float32 channels-last tensor the C
    kernels of :mod:`craft_runner.models.rprelu_cpu` (built once per machine, about a second), otherwise
    torch.compile'd ones (once per process on first use, a few seconds; eager if compiling is impossible).
    In eval mode it always uses the plain formula :func:`rprelu`: that is where Hessian-vector products are
    taken (:func:`craft_runner.sharpness.measuring_mode`), and they need a double backward.
    """

    def __init__(self, num_channels: int, beta_init: float = 0.25, fused: bool = True):
        super().__init__()
        self.num_channels = num_channels
        self.fused = fused  # not in the state_dict: checkpoints keep the keys gamma, zeta, beta
        self.gamma = nn.Parameter(torch.zeros(num_channels))
        self.zeta = nn.Parameter(torch.zeros(num_channels))
        self.beta = nn.Parameter(torch.full((num_channels,), float(beta_init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dim = 1 if x.ndim == 4 else -1
        if x.shape[dim] != self.num_channels:
            raise ValueError(f"RPReLU({self.num_channels}) got a tensor of shape {tuple(x.shape)} (channel dim {dim})")
        if self.fused and self.training and torch.is_grad_enabled():
            return _FusedRPReLU.apply(x, self.gamma, self.beta, self.zeta)
        return rprelu(x, self.gamma, self.beta, self.zeta)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, fused={self.fused}"


class PreActBasicBlock(nn.Module):
    """A residual block taken over from a BasicBlock (its modules, not copies): the post-addition
    activation is gone and ``act_pre`` starts the residual branch::

        out = drop_path(bn2(conv2(aa(act1(drop_block(bn1(conv1(act_pre(x))))))))) + shortcut(x)

    The shortcut keeps its name (``shortcut`` for resnet20, ``downsample`` for timm) so state_dict
    keys do not change.
    """

    def __init__(self, block: nn.Module, act_pre: nn.Module):
        super().__init__()
        self.act_pre = act_pre
        self.conv1 = block.conv1
        self.bn1 = block.bn1
        self.drop_block = getattr(block, "drop_block", None) or nn.Identity()
        self.act1 = block.act1
        self.aa = getattr(block, "aa", None) or nn.Identity()
        self.conv2 = block.conv2
        self.bn2 = block.bn2
        self.drop_path = getattr(block, "drop_path", None) or nn.Identity()
        self.shortcut_name = "downsample" if hasattr(block, "downsample") else "shortcut"
        setattr(self, self.shortcut_name, getattr(block, self.shortcut_name) or nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = getattr(self, self.shortcut_name)(x)
        out = self.drop_block(self.bn1(self.conv1(self.act_pre(x))))
        out = self.bn2(self.conv2(self.aa(self.act1(out))))
        return self.drop_path(out) + shortcut


class PreActDepthwiseSeparable(nn.Module):
    """A depthwise-separable unit taken over as ``act_pre -> conv_dw -> bn1 -> act1 -> conv_pw -> bn2``."""

    def __init__(self, block: DepthwiseSeparable, act_pre: nn.Module):
        super().__init__()
        self.act_pre = act_pre
        self.conv_dw = block.conv_dw
        self.bn1 = block.bn1
        self.act1 = block.act1
        self.conv_pw = block.conv_pw
        self.bn2 = block.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv_dw(self.act_pre(x))))
        return self.bn2(self.conv_pw(x))


def _act(base: type, channels: int, rprelu: bool) -> nn.Module:
    # Never in-place: a pre-activation reads the tensor the shortcut also reads.
    return RPReLU(channels) if rprelu else base()


def _timm_basic_resnet(model: nn.Module) -> bool:
    try:
        from timm.models.resnet import BasicBlock as TimmBasicBlock
        from timm.models.resnet import ResNet
    except ImportError:  # pragma: no cover - timm is a hard dependency
        return False
    if not isinstance(model, ResNet) or not isinstance(model.conv1, nn.Conv2d):
        return False
    blocks = [b for stage in (model.layer1, model.layer2, model.layer3, model.layer4) for b in stage]
    return all(type(b) is TimmBasicBlock and b.se is None for b in blocks)


def _resnet(model: nn.Module, stages: list, preact: bool, rprelu: bool) -> None:
    if rprelu:
        model.act1 = RPReLU(model.bn1.num_features)
    for stage in stages:
        for i, block in enumerate(stage):
            if rprelu:
                block.act1 = RPReLU(block.bn1.num_features)
                if not preact:  # with preact the post-addition activation is dropped
                    block.act2 = RPReLU(block.bn2.num_features)
            if preact:
                stage[i] = PreActBasicBlock(block, _act(nn.ReLU, block.conv1.in_channels, rprelu))


def _mobilenetv1(model: MobileNetV1Cifar, preact: bool, rprelu: bool) -> None:
    blocks = list(model.blocks)
    if rprelu:
        model.act1 = RPReLU(model.bn1.num_features)
        for block in blocks:
            block.act1 = RPReLU(block.bn1.num_features)
            block.act2 = RPReLU(block.bn2.num_features)
    if preact:
        # Unit i's pre-activation takes over unit i-1's post-activation (with its RPReLU
        # parameters), which keeps the function; the stem's own activation feeds unit 0.
        for i, block in enumerate(blocks):
            model.blocks[i] = PreActDepthwiseSeparable(block, blocks[i - 1].act2 if i > 0 else nn.Identity())
        model.final_act = blocks[-1].act2


def _mixer(model: MlpMixerCifar, preact: bool, rprelu: bool) -> None:
    for block in model.blocks:
        if rprelu:
            block.mlp_tokens.act = RPReLU(block.mlp_tokens.fc1.out_features)
            block.mlp_channels.act = RPReLU(block.mlp_channels.fc1.out_features)
        if preact:
            dim = block.norm1.normalized_shape[0]
            block.act_pre1 = _act(nn.GELU, dim, rprelu)
            block.act_pre2 = _act(nn.GELU, dim, rprelu)


def apply_snt(model: nn.Module, preact: bool, rprelu: bool) -> nn.Module:
    """Apply the SNT pre-activation reorder and/or RPReLU to ``model`` in place; returns ``model``.

    See the module docstring for what each switch does per architecture. Raises
    :class:`~craft_runner.config.ConfigError` when a switch is on and the model is not supported.
    """
    if not preact and not rprelu:
        return model
    name = type(model).__name__
    if isinstance(model, ResNetCifar):
        if not all(type(b) is CifarBasicBlock for stage in model.stages for b in stage):
            raise ConfigError(f"arch: {name} has already been transformed (apply_snt once per model)")
        _resnet(model, model.stages, preact, rprelu)
        if preact:
            model.final_act = _act(nn.ReLU, model.num_features, rprelu)
    elif _timm_basic_resnet(model):
        stages = [model.layer1, model.layer2, model.layer3, model.layer4]
        _resnet(model, stages, preact, rprelu)
        if preact:
            # Appended at the end of layer4: keeps every existing state_dict key.
            model.layer4.append(_act(nn.ReLU, model.num_features, rprelu))
    elif isinstance(model, MobileNetV1Cifar):
        if not all(type(b) is DepthwiseSeparable for b in model.blocks):
            raise ConfigError(f"arch: {name} has already been transformed (apply_snt once per model)")
        _mobilenetv1(model, preact, rprelu)
    elif isinstance(model, MlpMixerCifar):
        _mixer(model, preact, rprelu)
    else:
        raise ConfigError(
            f"arch.name=snt (preact={preact}, rprelu={rprelu}) is not supported for model {name}: "
            f"supported models are {', '.join(SNT_SUPPORTED)}; use arch=base for others")
    _logger.info("SNT applied to %s: preact=%s rprelu=%s", name, preact, rprelu)
    return model
