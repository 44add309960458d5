"""fsg — binary neural networks trained with learned gradient estimators.

Fast and Slow Gradient generation (FSG, AAAI 2025) and the baselines it is measured against
(STE; MetaQuant's FC-Grad, MultiFC, LSTMFC). Quick start::

    import fsg
    model = fsg.binarize(fsg.models.SmallCNN(), "dorefa")
    trainer = fsg.Trainer(model, "fsg", optimizer="sgd", lr=1e-3)
    for x, y in loader:
        trainer.step(x, y)
"""

from fsg import distributed, estimators, models, quantizers, ssm
from fsg.binarize import BinaryLayer, BinaryWeight, binarize, binarized_layers, is_binarized
from fsg.estimators import ESTIMATORS, Estimator, LayerContext, get_estimator, register_estimator
from fsg.quantizers import QUANTIZERS, Quantizer, get_quantizer, register_quantizer
from fsg.trainer import StepResult, Trainer, evaluate, make_optimizer
from fsg import data, train, io  # the application layers
from fsg.io import ExportError, ModelSummary, export_checkpoint, export_model, load_exported, read_exported, summary

# the module names of the flat layout before 0.2, kept as attributes (fsg.grid.run_grid, fsg.run.train, ...)
from fsg.data import synthetic
from fsg.ssm import mamba
from fsg.train import grid, loop as run

__version__ = "0.1.0"

__all__ = [
    "binarize", "binarized_layers", "is_binarized", "BinaryLayer", "BinaryWeight",
    "Estimator", "LayerContext", "ESTIMATORS", "get_estimator", "register_estimator",
    "Quantizer", "QUANTIZERS", "get_quantizer", "register_quantizer",
    "Trainer", "StepResult", "evaluate", "make_optimizer",
    "export_model", "export_checkpoint", "load_exported", "read_exported", "ExportError",
    "summary", "ModelSummary",
    "data", "distributed", "estimators", "grid", "io", "mamba", "models", "quantizers", "run", "ssm", "synthetic",
    "train",
    "__version__",
]
