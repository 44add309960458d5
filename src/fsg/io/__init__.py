"""Files a trained network leaves the project in: bit-packed export and model summaries.

* :mod:`fsg.io.export` — a binary network written with 1 bit per weight in a pickle-free
  safetensors file, and read back into a model.
* :mod:`fsg.io.summary` — per-layer parameters, memory and MACs of a (binarized) model or file.
"""

from fsg.io.export import ExportError, export_checkpoint, export_model, load_exported, read_exported
from fsg.io.summary import ModelSummary, summary

__all__ = ["ExportError", "export_checkpoint", "export_model", "load_exported", "read_exported",
           "ModelSummary", "summary"]
