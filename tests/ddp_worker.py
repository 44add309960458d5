"""One process of the multi-process tests (tests/test_distributed.py), launched the way
``torchrun`` launches a rank: ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` in the
environment. Trains each requested estimator for a few steps on the synthetic task, through
:class:`fsg.data.DataLoader`'s sharding, and saves every rank's trainer state to
``<out>/<estimator>-rank<r>.pt``.

usage: ddp_worker.py OUT MODEL STEPS BATCH ESTIMATOR[,ESTIMATOR...] [--activations]
"""

import os
import sys

import torch

import fsg
from fsg import distributed as dist
from fsg.data import DataLoader, load_dataset
from fsg.models import MLP, SmallCNN

ESTIMATOR_OPTIONS = {
    "fsg": dict(history=3),
    "fsg-stream": dict(layout="stream"),
    "fsg-fast": dict(history=2, update="fast"),
}


def main(argv):
    out, model_name, steps, batch, names = argv[:5]
    activations = "--activations" in argv
    steps, batch = int(steps), int(batch)
    torch.set_num_threads(1)
    joined, _ = dist.init_from_env("cpu")
    r, world = dist.rank(), dist.world_size()
    ds = load_dataset("synthetic", split="train", n_train=64, n_test=16, num_classes=4, channels=1, size=8, seed=3)
    for name in names.split(","):
        torch.manual_seed(100 + r)  # different initialisations per rank: the trainer must broadcast rank 0's
        if model_name == "mlp":
            model = MLP(64, [16], 4)
        else:
            model = SmallCNN(in_channels=1, num_classes=4, width=4)
        fsg.binarize(model, "dorefa", activations=activations)
        est = "fsg" if name.startswith("fsg") else name
        trainer = fsg.Trainer(model, est, optimizer="adam", lr=1e-2, **ESTIMATOR_OPTIONS.get(name, {}))
        loader = DataLoader(ds, batch, train=True, seed=0, rank=r, world_size=world)
        losses = []
        it = iter(loader)
        for _ in range(steps):
            try:
                x, y = next(it)
            except StopIteration:
                it = iter(loader)
                x, y = next(it)
            res = trainer.step(x, y)
            losses.append((res.loss, res.accuracy, res.samples))
        torch.save({"state": trainer.state_dict(), "losses": losses, "world": world},
                   os.path.join(out, f"{name}-rank{r}.pt"))
    if joined:
        dist.barrier()  # leave the group together (a rank tearing gloo down early can abort the other)
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
