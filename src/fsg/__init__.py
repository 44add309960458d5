"""fsg — binary neural networks trained with learned gradient estimators.

Fast and Slow Gradient generation (FSG, AAAI 2025) and the baselines it is measured against
(STE; MetaQuant's FC-Grad, MultiFC, LSTMFC). Quick start::

    import fsg
    model = fsg.binarize(fsg.models.SmallCNN(), "dorefa")
    trainer = fsg.Trainer(model, "fsg", optimizer="sgd", lr=1e-3)
    for x, y in loader:
        trainer.step(x, y)
"""

from . import distributed, estimators, mamba, models, quantizers, ssm, synthetic
from .binarize import BinaryLayer, BinaryWeight, binarize, binarized_layers, is_binarized
from .estimators import ESTIMATORS, Estimator, LayerContext, get_estimator, register_estimator
from .quantizers import QUANTIZERS, Quantizer, get_quantizer, register_quantizer
from .trainer import StepResult, Trainer, evaluate, make_optimizer
from .export import ExportError, export_checkpoint, export_model, load_exported, read_exported
from .summary import ModelSummary, summary
from . import data, grid, run  # fsg.data.DataLoader, fsg.grid.run_grid, fsg.run.train after `import fsg`

__version__ = "0.1.0"

__all__ = [
    "binarize", "binarized_layers", "is_binarized", "BinaryLayer", "BinaryWeight",
    "Estimator", "LayerContext", "ESTIMATORS", "get_estimator", "register_estimator",
    "Quantizer", "QUANTIZERS", "get_quantizer", "register_quantizer",
    "Trainer", "StepResult", "evaluate", "make_optimizer",
    "export_model", "export_checkpoint", "load_exported", "read_exported", "ExportError",
    "summary", "ModelSummary",
    "data", "distributed", "estimators", "grid", "mamba", "models", "quantizers", "run", "ssm", "synthetic",
    "__version__",
]
