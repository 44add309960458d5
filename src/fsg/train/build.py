"""A run's parts from its :class:`~fsg.train.config.TrainConfig`: the data splits (with the
validation split and fixed subsets), the model (pre-trained weights, binarization), the trainer
(:class:`fsg.Trainer`, or :class:`FullPrecisionTrainer` for ``fsg pretrain``) and the seeding."""

from __future__ import annotations

import dataclasses
import random
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fsg import distributed as dist
from fsg.binarize import binarize
from fsg.models import SmallCNN, get_model, load_pretrained
from fsg.optim import make_optimizer
from fsg.train.config import TrainConfig, amp_dtype
from fsg.trainer import (StepResult, StepSnapshot, Trainer, accuracy, autocast_context, average_over_ranks,
                         check_autocast_dtype, check_nonfinite_policy, nonfinite_names, reject_step, step_finite)

__all__ = ["FullPrecisionTrainer", "subset", "split_validation", "build_data", "build_model", "build_trainer",
           "seed_everything"]


class FullPrecisionTrainer:
    """Plain autograd training of an unbinarized model (``fsg pretrain``), with the interface
    of :class:`~fsg.trainer.Trainer` that the loop uses (``step``, ``lr``, ``optimizer``,
    ``step_count``, ``state_dict``/``load_state_dict``)."""

    def __init__(self, model: nn.Module, optimizer: str = "sgdm", lr: float = 0.1,
                 weight_decay: Optional[float] = None, loss_fn=None, autocast_dtype: Optional[torch.dtype] = None,
                 nonfinite: str = "raise", max_skips: int = 10):
        self.autocast_dtype = check_autocast_dtype(autocast_dtype)
        self.nonfinite, self.max_skips = check_nonfinite_policy(nonfinite, max_skips)
        self.skipped = self.skipped_in_a_row = 0
        self.model = model
        self.optimizer = make_optimizer(optimizer, model.parameters(), lr, weight_decay=weight_decay)
        self.loss_fn = loss_fn or F.cross_entropy
        self.step_count = 0
        self.distributed = dist.is_distributed()
        if self.distributed:
            dist.broadcast_(list(model.parameters()) + list(model.buffers()))

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def step(self, x: Tensor, y: Tensor) -> StepResult:
        self.model.train()
        lr = self.lr
        before = StepSnapshot(list(self.model.parameters()), [], list(self.model.buffers()), None, False)
        device = next(self.model.parameters()).device
        with autocast_context(device, self.autocast_dtype):
            out = self.model(x)
            loss = self.loss_fn(out if self.autocast_dtype is None else out.float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        loss_value, acc, samples = loss.detach(), accuracy(out.detach(), y), int(y.shape[0])
        if self.distributed:
            loss_value, acc, samples = average_over_ranks(self.model, [], loss_value, acc, samples)
        # the non-finite check before the update (as fsg.trainer.Trainer.step)
        checked = [(("gradient of", n), p.grad) for n, p in self.model.named_parameters() if p.grad is not None]
        checked += [(("buffer", n), b) for n, b in self.model.named_buffers() if b.is_floating_point()]
        if not step_finite(loss_value, checked):
            culprits = nonfinite_names(checked)
            before.restore()
            return reject_step(self, loss_value, culprits, lr, acc, samples)
        self.skipped_in_a_row = 0
        self.optimizer.step()
        self.step_count += 1
        return StepResult(float(loss_value), acc, lr, self.step_count - 1, samples)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "step_count": self.step_count, "estimator_name": None,
                "skipped": {"total": self.skipped, "in_a_row": self.skipped_in_a_row}}

    def load_state_dict(self, state: dict) -> None:
        missing = [k for k in ("model", "optimizer", "step_count") if k not in state]
        if missing:
            raise ValueError(f"trainer state lacks {', '.join(missing)}")
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as e:
            raise ValueError(" ".join(str(e).split())) from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_count = int(state["step_count"])
        skipped = state.get("skipped") or {}
        self.skipped, self.skipped_in_a_row = int(skipped.get("total", 0)), int(skipped.get("in_a_row", 0))


def subset(ds, n: Optional[int]):
    """A fixed random subset of ``n`` samples (the same for every run: seed 0), in the original
    order. Image folders and CIFAR files are ordered by class or not at all, so a prefix could
    hold a single class."""
    if n is None or n >= len(ds):
        return ds
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:n].sort().values
    return dataclasses.replace(ds, images=ds.images[idx], labels=ds.labels[idx])


def split_validation(ds, n: int):
    """``(train, val)``: ``n`` images of ``ds`` drawn at random with a fixed generator (seed 0),
    so every run holds out the same ones whatever its own seed; both keep the original order."""
    if n >= len(ds):
        raise ValueError(f"val_split must be smaller than the training set ({len(ds)} images), got {n}")
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))
    pick = lambda idx: dataclasses.replace(ds, images=ds.images[idx], labels=ds.labels[idx])
    return pick(perm[n:].sort().values), pick(perm[:n].sort().values)


def build_data(cfg: TrainConfig, splits: Tuple[str, ...] = ("train", "test")):
    """``{split: (dataset, loader)}`` for the configuration (train: shuffled, augmented per
    ``cfg.augment``; test: in order, never augmented). With ``cfg.val_split`` (and "train" in
    ``splits``) also ``"val"``: images held out of the training split (:func:`split_validation`,
    before ``train_subset`` is drawn from the rest), in order, never augmented."""
    from fsg.data import DataLoader, load_dataset

    out = {}
    for split in splits:
        ds = load_dataset(cfg.dataset, data_dir=cfg.data_dir, split=split, download=cfg.download,
                          **(cfg.dataset_options if cfg.dataset == "synthetic" else {}))
        shard = dict(rank=dist.rank(), world_size=dist.world_size())  # one process: rank 0 of 1
        if split == "train" and cfg.val_split is not None:
            ds, val = split_validation(ds, cfg.val_split)
            out["val"] = (val, DataLoader(val, cfg.eval_batch_size, train=False, device=cfg.device, **shard))
        ds = subset(ds, cfg.train_subset if split == "train" else cfg.test_subset)
        if len(ds) == 0:
            raise ValueError(f"the {split} split of {cfg.dataset!r} is empty")
        if split == "train":
            loader = DataLoader(ds, cfg.batch_size, train=True, seed=cfg.seed, augment=cfg.augment, device=cfg.device,
                                **shard)
        else:
            loader = DataLoader(ds, cfg.eval_batch_size, train=False, device=cfg.device, **shard)
        out[split] = (ds, loader)
    return out


def build_model(cfg: TrainConfig, dataset, *, pretrained: bool = True, log: Callable[[str], None] = None) -> nn.Module:
    """The model for ``dataset`` (channels, classes): built, pre-trained weights loaded (when
    ``cfg.pretrained`` and ``pretrained``), binarized (unless ``cfg.full_precision``), moved to
    ``cfg.device``."""
    channels = int(dataset.images.shape[1])
    classes = len(dataset.classes)
    if cfg.model == "small-cnn":
        model: nn.Module = SmallCNN(in_channels=channels, num_classes=classes, width=cfg.width,
                                    activation=cfg.model_activation)
    else:
        if channels != 3:
            raise ValueError(f"{cfg.model} takes 3-channel images; the {cfg.dataset} data has {channels} "
                             "(for the synthetic dataset pass channels=3 in its options)")
        model = get_model(cfg.model, num_classes=classes, activation=cfg.model_activation,
                          classifier_bn=cfg.classifier_bn)
    if cfg.pretrained and pretrained:
        fresh = load_pretrained(model, cfg.pretrained)
        if log is not None:
            note = f" (not in the file, initialised fresh: {', '.join(fresh)})" if fresh else ""
            log(f"fsg: loaded pre-trained weights {cfg.pretrained}{note}")
    if not cfg.full_precision:
        binarize(model, cfg.quantizer, bits=cfg.bits, keep_first=cfg.keep_first, keep_last=cfg.keep_last,
                 activations=cfg.activations)
    return model.to(cfg.device)


def build_trainer(cfg: TrainConfig, model: nn.Module):
    """The :class:`~fsg.trainer.Trainer` (or :class:`FullPrecisionTrainer`) for ``model``."""
    if cfg.full_precision:
        return FullPrecisionTrainer(model, cfg.optimizer, cfg.lr, weight_decay=cfg.weight_decay,
                                    autocast_dtype=amp_dtype(cfg.amp), nonfinite=cfg.nonfinite,
                                    max_skips=cfg.max_skips)
    return Trainer(model, cfg.estimator, optimizer=cfg.optimizer, lr=cfg.lr, update_on_observe=cfg.update_on_observe,
                   weight_decay=cfg.weight_decay, adam_variant=cfg.adam_variant, autocast_dtype=amp_dtype(cfg.amp),
                   nonfinite=cfg.nonfinite, max_skips=cfg.max_skips, **cfg.estimator_options)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2 ** 32))
    except ImportError:  # pragma: no cover
        pass

