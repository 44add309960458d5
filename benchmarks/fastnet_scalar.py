"""The scalar ``a`` of FSG's linear fast-net (``F(W̃) = a·W̃``: the product of its three bias-free
weight matrices) in run directories' checkpoints, and at initialisation (rebuilt from each run's
configuration, seed included).

    python benchmarks/fastnet_scalar.py RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import sys

import torch

from fsg.train.checkpoint import load_checkpoint
from fsg.train.config import TrainConfig
from fsg.train.build import build_data, build_model, build_trainer, seed_everything as _seed_everything


def scalar(state) -> float:
    return (state["fast.layers.2.weight"] @ state["fast.layers.1.weight"] @ state["fast.layers.0.weight"]).item()


def main(argv=None) -> int:
    for run in (argv if argv is not None else sys.argv[1:]):
        ck = load_checkpoint(f"{run}/last.pt")
        cfg = TrainConfig.from_dict(ck["config"])
        _seed_everything(cfg.seed)  # as fsg train does, then the same construction order
        ds, _ = build_data(cfg, splits=("train",))["train"]
        trainer = build_trainer(cfg, build_model(cfg, ds))
        print(f"{run}: a = {scalar(trainer.estimator.state_dict()):.4g} at initialisation, "
              f"{scalar(ck['trainer']['estimator']):.4g} after step {ck['step']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
