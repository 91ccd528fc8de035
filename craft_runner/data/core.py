"""DataBundle, the object every data set builds, and the loaders it hands out.

Small data sets are held as tensors on the run's device and batched by :class:`TensorLoader`,
which costs no worker processes and no host-to-device copies per batch; larger ones are torch
Datasets read by a DataLoader with workers and pinned memory.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Optional

import torch

from craft_runner.schema import DatasetConfig

# How torch re-raises an exception of a DataLoader worker (torch._utils.ExceptionWrapper.reraise): the
# exception's type called on "Caught <type> <where>.\nOriginal Traceback ...", the worker's traceback, whose last
# line is "<module>.<type>: <the original message>".
_WORKER_WRAPPED = re.compile(r"^Caught \w+ (?P<where>[^\n]*)\.\nOriginal ")


class ImageReadError(ValueError):
    """A sample of a data set that cannot be read (a file that is no image, a truncated one); the message is one
    line naming the file.

    Raised in a DataLoader worker, it reaches the main process as ``ImageReadError("Caught ImageReadError in
    DataLoader worker process 0.\nOriginal Traceback ...")``: the original one line is recovered from that text
    (the worker's traceback is kept as ``worker_traceback``), so what reaches the top still names the file.
    """

    def __init__(self, message: str = ""):
        text = str(message)
        self.worker_traceback: Optional[str] = None
        if _WORKER_WRAPPED.match(text):
            self.worker_traceback = text
            last = next((ln for ln in reversed(text.splitlines()) if ln.strip()), "")
            _, sep, original = last.partition(f"{type(self).__name__}: ")
            if sep and original.strip():
                text = original.strip()
        super().__init__(text)


class TensorLoader:
    """Batches of (x, y) from tensors already on the device; reshuffles every epoch.

    ``augment(x, generator)`` runs on each batch (training only), then ``transform(x)`` (e.g. uint8 to
    normalised float); both see the batch on its device.

    Sharded (``world > 1``, a distributed run): every rank draws the same order and takes rows ``rank::world``
    of each global batch of ``batch_size``, so the ranks' batches together are the one-process batch (what
    DistributedSampler does for a Dataset). A last batch is cut to a multiple of ``world`` so that every rank's
    share has the same size (the mean of the ranks' mean losses is then the global mean).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = False,
                 seed: int = 0, drop_last: bool = False,
                 augment: Optional[Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = None,
                 transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, rank: int = 0, world: int = 1):
        if not 0 <= rank < world:
            raise ValueError(f"TensorLoader: rank {rank} is not in 0..{world - 1}")
        self.rank, self.world = rank, world
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.augment = augment
        self.transform = transform
        self.generator = torch.Generator().manual_seed(seed)
        # set by the training loop when the optimizer asks for it (SAF): batches are then (x, y, sample index)
        self.with_index = False

    def __len__(self) -> int:
        n = len(self.y)
        if self.world > 1 and n % self.batch_size < self.world:
            n -= n % self.batch_size  # a last batch too small to give every rank a row
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.y)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        order = order.to(self.x.device)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            if self.world > 1:
                idx = idx[:len(idx) - len(idx) % self.world][self.rank::self.world]
            x = self.x[idx]
            if self.augment is not None:
                x = self.augment(x, self.generator)
            if self.transform is not None:
                x = self.transform(x)
            yield (x, self.y[idx], idx) if self.with_index else (x, self.y[idx])

    # The shuffling generator is part of a resumable training state.
    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


@dataclass
class DataBundle:
    name: str
    num_classes: int
    in_chans: int
    img_size: int
    train_x: Optional[torch.Tensor]  # tensors when the set is held in memory
    train_y: Optional[torch.Tensor]
    test_x: Optional[torch.Tensor]
    test_y: Optional[torch.Tensor]
    train_dataset: object = None  # torch Datasets otherwise
    train_eval_dataset: object = None  # training images with evaluation transforms
    test_dataset: object = None
    augment: Optional[Callable] = None  # (x, generator) -> x, on training batches of train_x
    # x -> x on every batch of train_x/test_x after augment: None when they are model-ready already;
    # CIFAR held on the device is stored as uint8 at 32x32 and resized and normalised here, per batch.
    transform: Optional[Callable] = None
    classes: Optional[list] = None
    data_config: Optional[dict] = None  # the resolved timm data config the transforms follow
    root: Optional[str] = None  # the folder read, for on-disk sets
    # A validation split held out of the training one (dataset.val_fraction, craft_runner.data.split), read
    # with the evaluation transforms; None: no validation split.
    val_x: Optional[torch.Tensor] = None
    val_y: Optional[torch.Tensor] = None
    val_dataset: object = None
    # The labels of train_dataset's samples (on-disk sets), for a stratified hold-out without reading images.
    train_targets: Optional[list] = None

    @property
    def n_train(self) -> int:
        return len(self.train_y) if self.train_y is not None else len(self.train_dataset)

    @property
    def n_test(self) -> int:
        return len(self.test_y) if self.test_y is not None else len(self.test_dataset)

    @property
    def n_val(self) -> int:
        if self.val_y is not None:
            return len(self.val_y)
        return len(self.val_dataset) if self.val_dataset is not None else 0

    def splits(self) -> dict:
        """How many samples each split holds (results.json's ``splits``); val is carved out of train."""
        return {"train": self.n_train, "val": self.n_val, "test": self.n_test}

    def _on(self, device: torch.device) -> None:
        # Copied once and kept, so a loader made every epoch costs no new host-to-device copy.
        for k in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
            t = getattr(self, k)
            if t is not None and t.device != torch.device(device):
                setattr(self, k, t.to(device))

    def train_loader(self, batch_size: int, seed: int, device: torch.device, cfg: DatasetConfig, rank: int = 0,
                     world: int = 1):
        """Batches of ``batch_size`` (the global batch); with ``world > 1`` this rank's share of each."""
        if self.train_x is not None:
            self._on(device)
            return TensorLoader(self.train_x, self.train_y, batch_size, shuffle=True, seed=seed,
                                augment=self.augment, transform=self.transform, rank=rank, world=world)
        return _torch_loader(self.train_dataset, batch_size, True, seed, cfg, device, rank, world)

    def eval_loader(self, batch_size: int, device: torch.device, cfg: DatasetConfig, split: str = "test"):
        """Batches of the test split, or of the validation split (``split="val"``), in order."""
        if split not in ("test", "val"):
            raise ValueError(f"eval_loader: split={split!r} is not allowed: expected test or val")
        if split == "val" and not self.n_val:
            raise ValueError("eval_loader: no validation split (dataset.val_fraction=0)")
        x, y, ds = (self.val_x, self.val_y, self.val_dataset) if split == "val" else \
            (self.test_x, self.test_y, self.test_dataset)
        if x is not None:
            self._on(device)
            x, y = (self.val_x, self.val_y) if split == "val" else (self.test_x, self.test_y)
            return TensorLoader(x, y, batch_size, transform=self.transform)
        return _torch_loader(ds, batch_size, False, 0, cfg, device)

    def calib_batches(self, n: int, batch_size: int, seed: int, device: torch.device):
        """A fixed, seeded subset of the training split (evaluation transforms), as a list of batches."""
        idx = calib_indices(self.n_train, n, seed)
        if self.train_x is not None:
            x, y = self.train_x[idx.to(self.train_x.device)], self.train_y[idx.to(self.train_y.device)]
            if self.transform is not None:
                x = self.transform(x)
        else:
            ds = self.train_eval_dataset or self.train_dataset
            items = [ds[int(i)] for i in idx]
            x = torch.stack([it[0] for it in items])
            y = torch.as_tensor([int(it[1]) for it in items])
        return [(x[i:i + batch_size].to(device), y[i:i + batch_size].to(device))
                for i in range(0, len(y), batch_size)]


def calib_indices(n_total: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_total, generator=g)[:min(n, n_total)]


def _torch_loader(ds, batch_size, shuffle, seed, cfg: DatasetConfig, device, rank: int = 0, world: int = 1):
    # The generator fixes the order and, through each worker's base seed, the augmentation in workers.
    g = torch.Generator().manual_seed(seed)
    workers = cfg.num_workers
    device = torch.device(device)
    sampler = None
    if world > 1:  # fit() calls sampler.set_epoch every epoch
        sampler = torch.utils.data.DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed,
                                                      drop_last=True)
        batch_size, shuffle = batch_size // world, False
    return torch.utils.data.DataLoader(
        ds, batch_size=batch_size, shuffle=shuffle, sampler=sampler, generator=g, num_workers=workers,
        pin_memory=cfg.pin_memory and device.type == "cuda",
        persistent_workers=cfg.persistent_workers and workers > 0, drop_last=False)
