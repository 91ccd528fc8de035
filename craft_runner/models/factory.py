"""Build a model from a :class:`craft_runner.config.ModelConfig` with timm, and load checkpoints.

Three ways to get weights:

- ``pretrained: true`` + ``checkpoint_path``: timm's own pretrained loader reads the local file
  (``pretrained_cfg_overlay=dict(file=...)``), so its format conversions, input-conv adaptation and
  new classifier head for ``num_classes`` apply exactly as for hub weights.
- ``pretrained: true`` alone: timm fetches from the Hugging Face hub (or its local cache). When the
  hub cannot be reached the error says to set ``model.checkpoint_path``; an unreachable hub is
  detected with one short connection probe, so this fails in seconds rather than after
  huggingface_hub's minute of retries.
- ``pretrained: false`` + ``checkpoint_path``: a full checkpoint of the same architecture (a
  state_dict, or a dict holding one under ``"model"`` or ``"state_dict"``), loaded strictly.

Pass ``arch=`` to :func:`create_model` to apply the SNT transforms in the right order relative to
these loads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import re
import socket
from collections.abc import Iterator, Mapping
from typing import Optional
from urllib.parse import urlparse

import timm
import torch
from torch import nn

from craft_runner.models import cifar  # noqa: F401  (registers the CIFAR models in timm)
from craft_runner.models.snt import apply_snt
from craft_runner.schema import ArchConfig, ConfigError, ModelConfig

_logger = logging.getLogger(__name__)

__all__ = ["CheckpointError", "CIFAR_MODELS", "check_model_name", "create_model", "load_checkpoint",
           "read_state_dict", "model_data_config"]

CIFAR_MODELS = ("resnet20", "mobilenetv1_cifar", "mixer_s_cifar")

_HUB_PROBE_TIMEOUT_S = 3.0


class CheckpointError(ConfigError):
    """A checkpoint file that is missing, unreadable or does not fit the model; the message is one line."""


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_model_name(name: str) -> None:
    """Raise :class:`ConfigError` unless timm can build ``name`` (an architecture, optionally ``.tag``)."""
    arch = name.split(".", 1)[0] if isinstance(name, str) else name
    if not isinstance(name, str) or not timm.is_model(arch):
        raise ConfigError(
            f"model.name={name!r} is not allowed: expected a timm model name (see timm.list_models()) "
            f"or one of {', '.join(CIFAR_MODELS)}")
    if "." in name and name not in timm.list_pretrained(arch + ".*"):
        tags = [t.split(".", 1)[1] for t in timm.list_pretrained(arch + ".*")]
        raise ConfigError(
            f"model.name={name!r} is not allowed: timm knows no pretrained tag {name.split('.', 1)[1]!r} for "
            f"{arch} (known: {', '.join(tags) or 'none'}; see timm.list_pretrained('{arch}.*'))")


# --------------------------------------------------------------------------------------------- hub access


def _hub_reachable(timeout: float = _HUB_PROBE_TIMEOUT_S) -> bool:
    """One TCP connection to the HF endpoint; False when offline mode is set or the host cannot be reached."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT") or constants.ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline_if_unreachable() -> Iterator[None]:
    """Put huggingface_hub in offline mode (local cache only) while the hub cannot be reached."""
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    old = constants.HF_HUB_OFFLINE
    if not old and not _hub_reachable():
        _logger.info("Hugging Face hub unreachable: looking for pretrained weights in the local cache only")
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old


# ------------------------------------------------------------------------------------------- checkpoints


def read_state_dict(path: str) -> dict:
    """Read a state_dict from ``path``: a bare one, or one under ``"model"`` / ``"state_dict"`` keys.

    Accepts safetensors and torch files (read with ``weights_only=True``); strips a ``module.`` prefix
    left by DistributedDataParallel. Raises :class:`CheckpointError` for anything else.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"model.checkpoint_path={path!r}: no such file")
    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file

            obj = load_file(path, device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a torch/safetensors/pickle error: the file is not a checkpoint
        why = "" if isinstance(e, (KeyError, pickle.UnpicklingError, EOFError)) else f": {_one_line(e, 150)}"
        raise CheckpointError(
            f"model.checkpoint_path={path!r} is not a readable checkpoint (expected a .safetensors file or a "
            f"torch.save file of tensors){why}") from None
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"model.checkpoint_path={path!r} holds no state_dict (expected a dict of tensors, or one under "
            f"a 'model' or 'state_dict' key)")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


def _first_mismatch(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> Optional[str]:
    own = model.state_dict()
    for k, v in own.items():
        if k not in state_dict:
            return f"missing key {k!r}"
        if tuple(state_dict[k].shape) != tuple(v.shape):
            return f"key {k!r} has shape {tuple(state_dict[k].shape)} in the checkpoint, {tuple(v.shape)} in the model"
    for k in state_dict:
        if k not in own:
            return f"unexpected key {k!r}"
    return None


def load_checkpoint(model: nn.Module, path: str) -> nn.Module:
    """Load a full checkpoint of the same architecture into ``model`` strictly (in place; returns it)."""
    state_dict = read_state_dict(path)
    problem = _first_mismatch(model, state_dict)
    if problem:
        raise CheckpointError(
            f"model.checkpoint_path={path!r} does not fit {type(model).__name__}: {problem}")
    model.load_state_dict(state_dict, strict=True)
    _logger.info("Loaded checkpoint %s (%d tensors)", path, len(state_dict))
    return model


class _MissingKeys(logging.Handler):
    """Collects the keys timm's pretrained loader reports missing (it loads non-strictly for a new head)."""

    _pattern = re.compile(r"Missing keys \((.*)\) discovered")

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.keys: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        m = self._pattern.search(record.getMessage())
        if m:
            self.keys.extend(k.strip() for k in m.group(1).split(","))


@contextlib.contextmanager
def _capture_missing_keys() -> Iterator[_MissingKeys]:
    log = logging.getLogger("timm.models._builder")
    handler, old_level = _MissingKeys(), log.level
    log.addHandler(handler)
    if not log.isEnabledFor(logging.INFO):
        log.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)


def _classifier_keys(model: nn.Module) -> set:
    names = model.pretrained_cfg.get("classifier") if hasattr(model, "pretrained_cfg") else None
    names = (names,) if isinstance(names, str) else tuple(names or ())
    return {k for k in model.state_dict() if any(k.startswith(n + ".") for n in names)}


_SIZE_MISMATCH = re.compile(
    r"size mismatch for ([^:]+): copying a param with shape torch\.Size\((\[[^\]]*\])\) from checkpoint, "
    r"the shape in current model is torch\.Size\((\[[^\]]*\])\)")


def _describe_load_error(e: Exception) -> str:
    """The first mismatching key of a torch load_state_dict error, else the error's first 200 characters."""
    m = _SIZE_MISMATCH.search(str(e))
    if m:
        return f"key {m.group(1)!r} has shape {m.group(2)} in the checkpoint, {m.group(3)} in the model"
    return f"{type(e).__name__}: {_one_line(e, 200)}"


# ------------------------------------------------------------------------------------------------ factory


def create_model(cfg: ModelConfig, num_classes: int, in_chans: int = 3, arch: Optional[ArchConfig] = None) -> nn.Module:
    """Build ``cfg.name`` with timm for ``cfg.num_classes or num_classes`` outputs.

    ``arch`` (optional) applies the SNT transforms (:func:`craft_runner.models.snt.apply_snt`) at the
    right moment: after pretrained backbone weights are loaded (they belong to the plain network),
    but before a full checkpoint (``pretrained: false``) is loaded, since that one was saved from the
    transformed network.

    Raises :class:`ConfigError` for an unknown name and :class:`CheckpointError` (a ConfigError) for
    weights that cannot be found or do not fit; both messages are one line.
    """
    try:
        model = _build(cfg, num_classes, in_chans, full_checkpoint=arch is None)
    except RuntimeError:
        check_model_name(cfg.name)  # an unknown name: say so in one line (checked only when timm fails)
        raise
    if arch is not None:
        apply_snt(model, preact=arch.preact, rprelu=arch.rprelu)
        if not cfg.pretrained and cfg.checkpoint_path:
            load_checkpoint(model, os.path.expanduser(cfg.checkpoint_path))
    return model


def _build(cfg: ModelConfig, num_classes: int, in_chans: int, full_checkpoint: bool) -> nn.Module:
    n_cls = cfg.num_classes if cfg.num_classes is not None else num_classes
    kwargs = dict(cfg.kwargs or {})
    kwargs.update(num_classes=n_cls, in_chans=in_chans, drop_rate=cfg.drop_rate)
    path = os.path.expanduser(cfg.checkpoint_path) if cfg.checkpoint_path else None

    if not cfg.pretrained:
        model = timm.create_model(cfg.name, pretrained=False, **kwargs)
        if path and full_checkpoint:
            load_checkpoint(model, path)
        return model

    if path:
        if not path.endswith(".npz"):  # .npz: timm's custom loader for original JAX ViT weights
            read_state_dict(path)  # fail with a clear message before timm's generic one
        try:
            with _capture_missing_keys() as missing:
                model = timm.create_model(cfg.name, pretrained=True, pretrained_cfg_overlay=dict(file=path), **kwargs)
        except ConfigError:
            raise
        except Exception as e:  # timm/torch errors on a checkpoint of another architecture
            raise CheckpointError(
                f"model.checkpoint_path={path!r} does not fit {cfg.name}: {_describe_load_error(e)}") from e
        # timm loads non-strictly when it replaces the head: anything else missing is a wrong file.
        lost = [k for k in missing.keys if k not in _classifier_keys(model)]
        if lost:
            raise CheckpointError(
                f"model.checkpoint_path={path!r} does not fit {cfg.name}: missing key {lost[0]!r} "
                f"({len(lost)} backbone keys missing)")
        _logger.info("Loaded pretrained %s from %s with a new %d-class head", cfg.name, path, n_cls)
        return model

    try:
        with _hub_offline_if_unreachable():
            return timm.create_model(cfg.name, pretrained=True, **kwargs)
    except ConfigError:
        raise
    except Exception as e:  # no network, not cached, no weights for this tag
        raise CheckpointError(
            f"model.pretrained=true: could not get pretrained weights for {cfg.name!r} "
            f"({type(e).__name__}: {_one_line(e, 120)}); on a machine without hub access set "
            f"model.checkpoint_path=/path/to/weights (a safetensors/.bin/.pth file of the timm model)") from e


def model_data_config(name: str) -> dict:
    """The model's own input size and normalisation (timm's data config), without building it."""
    from timm.data import resolve_data_config

    try:
        pcfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # a name timm has no pretrained config for
        pcfg = None
    return resolve_data_config(pretrained_cfg=pcfg.to_dict()) if pcfg else {"input_size": (3, 224, 224)}
