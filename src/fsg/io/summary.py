"""Per-layer summary of a (binarized) network: parameters, memory, multiply-accumulates.

:func:`summary` (``fsg.summary``; command ``fsg summary``) tabulates, like larq's
``model_summary``, every layer that owns parameters:

* **1-bit params**: the weights of a binarized layer (``fsg.binarize``; for k-bit ``dorefa``
  layers these weights take ``k`` bits each, see the ``bits`` column);
* **32-bit params**: every other parameter (biases, BatchNorm affine weights, layers kept in full
  precision). BatchNorm running statistics are buffers, not parameters, and are not counted;
* **memory** = 1-bit params × bits / 8 + 32-bit params × 4 bytes;
* **MACs** (multiply-accumulates of one sample, measured by one forward pass of a zero tensor of
  ``input_size`` with hooks): a conv layer does ``output elements × in_channels/groups × kernel
  area``, a linear layer ``in_features × out_features``; other layers count 0. A layer called
  several times counts every call.

Totals add the compression ratio against the same model in full precision:
``4 · (all params) / memory``.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from fsg.binarize import BinaryActivation, binarized_layers

__all__ = ["summary", "summarize_file", "summarize_table", "default_input_size", "LayerSummary", "ModelSummary"]

PathLike = Union[str, os.PathLike]
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class LayerSummary:
    """One row of a :class:`ModelSummary`."""

    name: str
    type: str
    binarized: bool
    quantizer: Optional[str]       # of a binarized layer
    bits: Optional[int]            # bits per binarized weight (1 = binary)
    input_bits: Optional[int]      # conv/linear: 1 when its input is binarized (sign, 1W1A), else 32
    params_1bit: int
    params_32bit: int
    memory_bytes: float
    macs: Optional[int]            # None without an input size


@dataclass
class ModelSummary:
    """What :func:`summary` returns: ``rows`` (:class:`LayerSummary`), ``totals`` (a dict),
    ``str(summary)`` the printed table, :meth:`to_dict` a JSON-able dict."""

    model: str
    input_size: Optional[Tuple[int, ...]]
    rows: List[LayerSummary]
    totals: Dict[str, Any]
    source: Dict[str, Any] = field(default_factory=dict)
    #: why MACs are missing when it is not the missing input size (an exported file without its architecture)
    macs_note: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        return {"model": self.model, "input_size": None if self.input_size is None else list(self.input_size),
                "rows": [asdict(r) for r in self.rows], "totals": dict(self.totals), "source": dict(self.source),
                "macs_note": self.macs_note}

    def __str__(self) -> str:
        t = self.totals
        size = "x".join(map(str, self.input_size)) if self.input_size else None
        head = f"{self.model}" + (f", input 1x{size}" if size else
                                  f", {self.macs_note or 'no input size (MACs not counted)'}")
        k_bit = any(r.bits and r.bits > 1 for r in self.rows)
        cols = ["layer", "type", "binarized", "in bits", "k-bit params" if k_bit else "1-bit params",
                "32-bit params", "memory KiB", "MACs"]

        def q(r: LayerSummary) -> str:
            if not r.binarized:
                return "no"
            return (r.quantizer or "yes") + (f" {r.bits}b" if r.bits and r.bits > 1 else "")

        body = [[r.name or "<root>", r.type, q(r), "-" if r.input_bits is None else str(r.input_bits),
                 f"{r.params_1bit:,}", f"{r.params_32bit:,}", f"{r.memory_bytes / 1024:.2f}",
                 "-" if r.macs is None else f"{r.macs:,}"] for r in self.rows]
        total = ["total", "", "", "", f"{t['params_1bit']:,}", f"{t['params_32bit']:,}",
                 f"{t['memory_bytes'] / 1024:.2f}", "-" if t["macs"] is None else f"{t['macs']:,}"]
        widths = [max(len(row[i]) for row in [cols, total] + body) for i in range(len(cols))]
        left = {0, 1, 2}

        def line(row):
            return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

        rule = "  ".join("-" * w for w in widths)
        out = [head, "", line(cols), rule] + [line(r) for r in body] + [rule, line(total), ""]
        out.append(f"params: {t['params']:,} ({t['params_1bit']:,} binarized, {t['params_32bit']:,} full precision)")
        out.append(f"memory: {_size(t['memory_bytes'])} ({_size(t['memory_fp_bytes'])} in full precision): "
                   f"compression {t['compression']:.2f}x")
        if t["macs"] is not None:
            out.append(f"MACs per sample: {_count(t['macs'])} ({_count(t['macs_binarized'])} in binarized layers, "
                       f"{_count(t['macs_binary_input'])} of them with binarized inputs; "
                       f"{_count(t['macs_full_precision'])} in full-precision layers)")
        return "\n".join(out)


def _size(n: float) -> str:
    return f"{n / 1024 ** 2:.2f} MiB" if n >= 1024 ** 2 else f"{n / 1024:.2f} KiB"


def _count(n: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return str(n)


def default_input_size(model: nn.Module) -> Optional[Tuple[int, ...]]:
    """The input size (without the batch dimension) used when none is given: 3×32×32 for the
    CIFAR ResNets, ``in_channels``×16×16 for :class:`~fsg.models.SmallCNN` (the demo task's
    images), ``in_features`` for :class:`~fsg.models.MLP`; ``None`` for other models."""
    from fsg.models import MLP, CifarResNet, SmallCNN

    if isinstance(model, CifarResNet):
        return (3, 32, 32)
    if isinstance(model, SmallCNN):
        return (int(model.conv1.in_channels), 16, 16)
    if isinstance(model, MLP):
        first = next(m for m in model.modules() if isinstance(m, nn.Linear))
        return (int(first.in_features),)
    return None


def _own_tensors(module: nn.Module) -> Dict[str, Tensor]:
    """Parameters the module owns directly (name → the parameter; a parametrized tensor by its
    plain name → its latent parameter(s))."""
    out: Dict[str, Tensor] = {k: p for k, p in module._parameters.items() if p is not None}
    if parametrize.is_parametrized(module):
        for name, plist in module.parametrizations.items():
            params = [p for k, p in plist.named_parameters() if k.startswith("original")]
            if len(params) == 1:
                out[name] = params[0]
            else:
                for i, p in enumerate(params):
                    out[f"{name}.original{i}"] = p
    return out


def _type_name(module: nn.Module) -> str:
    cls = type(module)
    if parametrize.is_parametrized(module) and cls.__name__.startswith("Parametrized") and len(cls.__mro__) > 1:
        cls = cls.__mro__[1]  # torch's dynamic Parametrized<Class> subclass: show <Class>
    return cls.__name__


def _macs(module: nn.Module, out: Tensor) -> int:
    if isinstance(module, _CONV):
        per_output = module.in_channels // module.groups * math.prod(module.kernel_size)
        return int(out[0].numel()) * per_output
    if isinstance(module, nn.Linear):
        return int(out[0].numel()) * module.in_features
    return 0


def _totals(rows: List[LayerSummary]) -> Dict[str, Any]:
    """Parameter and memory totals of the rows (MACs filled in by the caller where known)."""
    p1 = sum(r.params_1bit for r in rows)
    p32 = sum(r.params_32bit for r in rows)
    mem = sum(r.memory_bytes for r in rows)
    return {
        "params_1bit": p1, "params_32bit": p32, "params": p1 + p32, "memory_bytes": mem,
        "memory_fp_bytes": 4 * (p1 + p32), "compression": (4 * (p1 + p32) / mem) if mem else 1.0,
        "macs": None, "macs_binarized": None, "macs_binary_input": None, "macs_full_precision": None,
    }

def summary(model: Union[nn.Module, PathLike], input_size: Optional[Sequence[int]] = None, *,
            binarized: Optional[Union[Iterable[str], Mapping[str, Mapping[str, Any]]]] = None) -> ModelSummary:
    """Per-layer table of ``model``: binarized or not, 1-bit and 32-bit parameter counts, memory,
    multiply-accumulates (see the module docstring for the definitions); returns a
    :class:`ModelSummary` (``print(fsg.summary(model))`` prints the table).

    ``model``: an ``nn.Module`` (binarized with :func:`fsg.binarize` or not), or the path of a
    training checkpoint, run directory or exported file (:func:`summarize_file`).
    ``input_size``: one sample's shape without the batch dimension, e.g. ``(3, 32, 32)``; default
    :func:`default_input_size` (MACs are ``None`` when there is none). ``binarized``: the
    qualified names of the layers to count as binarized, or ``{name: {"quantizer", "bits"}}``
    (default: the layers carrying fsg's binary parametrization). The model is not changed (one
    forward pass in eval mode under ``torch.no_grad()``; training flags restored).
    """
    if isinstance(model, (str, os.PathLike)):
        return summarize_file(model, input_size)
    if not isinstance(model, nn.Module):
        raise ValueError(f"summary needs an nn.Module or a file path, got {type(model).__name__}")
    info = _binarized_info(model, binarized)
    entries = _param_entries(model)
    input_size = _checked_input_size(model, input_size)
    macs: Dict[str, int] = {}
    if input_size is not None:
        macs = _measure_macs(model, [(n, m) for n, m, _ in entries], input_size)
    counted = input_size is not None
    rows = [_layer_row(name, m, own, info.get(name), macs.get(name, 0) if counted else None)
            for name, m, own in entries]
    totals = _totals(rows)
    if counted:
        _add_mac_totals(totals, rows)
    return ModelSummary(_type_name(model), input_size, rows, totals)


def _binarized_info(model: nn.Module, binarized) -> Dict[str, Dict[str, Any]]:
    """The binarized layers' ``{name: {"quantizer", "bits"}}`` (``binarized`` as :func:`summary` takes it)."""
    if binarized is None:
        info = {l.name: {"quantizer": getattr(l.quantizer, "name", "") or type(l.quantizer).__name__,
                         "bits": int(getattr(l.quantizer, "bits", 1))} for l in binarized_layers(model)}
    elif isinstance(binarized, Mapping):
        info = {k: {"quantizer": v.get("quantizer"), "bits": int(v.get("bits", 1))} for k, v in binarized.items()}
    else:
        info = {k: {"quantizer": None, "bits": 1} for k in binarized}
    modules = dict(model.named_modules())
    unknown = [k for k in info if k not in modules]
    if unknown:
        raise ValueError(f"binarized layer(s) not in the model: {', '.join(unknown)}")
    return info


def _param_entries(model: nn.Module) -> List[Tuple[str, nn.Module, List[Tuple[str, int]]]]:
    """``(name, module, [(param name, numel)])`` of each module owning parameters, each parameter counted once."""
    seen = set()
    entries = []
    for name, m in model.named_modules():
        if "parametrizations" in name.split("."):
            continue
        own = []
        for pname, p in _own_tensors(m).items():
            if id(p) in seen:
                continue
            seen.add(id(p))
            own.append((pname, p.numel()))
        if own:
            entries.append((name, m, own))
    return entries


def _checked_input_size(model: nn.Module, input_size: Optional[Sequence[int]]) -> Optional[Tuple[int, ...]]:
    """The input size as a tuple of positive ints (the model's default when ``None``), or ``None``."""
    if input_size is None:
        input_size = default_input_size(model)
    if input_size is not None:
        input_size = tuple(int(d) for d in input_size)
        if not input_size or any(d < 1 for d in input_size):
            raise ValueError(f"input size must be positive integers, got {input_size}")
    return input_size


def _layer_row(name: str, m: nn.Module, own: List[Tuple[str, int]], b: Optional[Dict[str, Any]],
               macs: Optional[int]) -> LayerSummary:
    """The summary row of one module (``b``: its binarization info, ``None`` when full precision)."""
    p1 = sum(n for pname, n in own if b is not None and pname == "weight")
    p32 = sum(n for pname, n in own) - p1
    bits = b["bits"] if b is not None else None
    is_layer = isinstance(m, _CONV + (nn.Linear,))
    input_bits = None
    if is_layer:
        input_bits = 1 if any(isinstance(h, BinaryActivation) for h in m._forward_pre_hooks.values()) else 32
    return LayerSummary(
        name=name, type=_type_name(m), binarized=b is not None, quantizer=None if b is None else b["quantizer"],
        bits=bits, input_bits=input_bits, params_1bit=p1, params_32bit=p32,
        memory_bytes=p1 * (bits or 1) / 8 + p32 * 4, macs=macs)


def _add_mac_totals(totals: Dict[str, Any], rows: List[LayerSummary]) -> None:
    """Fill in the MAC totals (all, binarized, binarized with binary inputs, full precision)."""
    totals["macs"] = sum(r.macs for r in rows)
    totals["macs_binarized"] = sum(r.macs for r in rows if r.binarized)
    totals["macs_binary_input"] = sum(r.macs for r in rows if r.binarized and r.input_bits == 1)
    totals["macs_full_precision"] = totals["macs"] - totals["macs_binarized"]


def _measure_macs(model: nn.Module, entries: List[Tuple[str, nn.Module]], input_size: Tuple[int, ...]) -> Dict[str, int]:
    counts = {n: 0 for n, _ in entries}
    handles = []

    def hook(name):
        def fn(module, args, out):
            if isinstance(out, Tensor):
                counts[name] += _macs(module, out)
        return fn

    for name, m in entries:
        if isinstance(m, _CONV + (nn.Linear,)):
            handles.append(m.register_forward_hook(hook(name)))
    ref = next((p for p in model.parameters() if p.is_floating_point()), None)
    x = torch.zeros((1,) + input_size, dtype=ref.dtype if ref is not None else torch.float32,
                    device=ref.device if ref is not None else "cpu")
    modes = {m: m.training for m in model.modules()}
    # the sign pre-hooks may keep state (a one-time check of their input, which a zero input would
    # trip with a warning): silence them and restore their state afterwards
    hooks = [h for m in model.modules() for h in m._forward_pre_hooks.values() if isinstance(h, BinaryActivation)]
    hook_state = [dict(vars(h)) for h in hooks]
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model(x)
    except Exception as e:  # noqa: BLE001 - a wrong input size: one line
        msg = " ".join(str(e).split())
        raise ValueError(f"a forward pass of {type(model).__name__} on an input of size "
                         f"1x{'x'.join(map(str, input_size))} failed: {msg[:160]}") from None
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
        for h, state in zip(hooks, hook_state):
            vars(h).clear()
            vars(h).update(state)
    return counts


def summarize_file(path: PathLike, input_size: Optional[Sequence[int]] = None) -> ModelSummary:
    """:func:`summary` of the model in a training checkpoint (``last.pt`` or a run directory,
    rebuilt without its dataset by :func:`fsg.io.export.model_from_checkpoint`) or in an exported
    file (:func:`fsg.io.export.load_exported`, the binarized layers read from its metadata; a file
    that records no built-in architecture is summarised from its own layer table,
    :func:`summarize_table`)."""
    from fsg.io.export import load_exported, model_from_checkpoint, read_exported

    p = Path(path)
    is_ckpt = p.is_dir()
    if p.is_file():
        with open(p, "rb") as f:
            is_ckpt = f.read(4) == b"PK\x03\x04"
    if is_ckpt:
        model, info = model_from_checkpoint(p)
        s = summary(model, input_size)
        s.model = f"{s.model} ({info['arch']['name']}) from {info['checkpoint']} (step {info['step']})"
        s.source = {"checkpoint": info["checkpoint"], "step": info["step"], "epoch": info["epoch"], "arch": info["arch"]}
        return s
    exp = read_exported(p)
    if exp.arch is None:  # a user's own architecture: what the file itself records
        return summarize_table(exp, input_size)
    model = load_exported(p)
    s = summary(model, input_size, binarized={r["name"]: r for r in exp.layers})
    s.model = f"{s.model} ({exp.arch['name']}) from {p}"
    s.source = {"exported": str(p), "arch": exp.arch, **{k: v for k, v in exp.source.items() if k != "checkpoint"}}
    return s


#: BatchNorm's running statistics: buffers, not parameters (counted by no summary)
_BUFFER_NAMES = ("running_mean", "running_var", "num_batches_tracked")


def summarize_table(exp, input_size: Optional[Sequence[int]] = None) -> ModelSummary:
    """The summary of an exported file (:class:`fsg.io.export.ExportedModel`) from its own tables,
    without the architecture: one row per module (the tensor names' prefixes, in name order); a
    binarized layer's weights (its ``layers`` record: shape, quantizer, bits, binarized input)
    are its 1-bit (k-bit) parameters, every other tensor a 32-bit parameter, except BatchNorm's
    running statistics (tensors named ``running_mean``, ``running_var``, ``num_batches_tracked``),
    which are buffers. Counts and memory are those :func:`summary` gives for the model; the layer
    types and MACs need the architecture: ``fsg.summary(fsg.load_exported(path, model=MyNet()))``."""
    where = str(exp.path)
    if input_size is not None:
        raise ValueError(f"{where} records no built-in architecture, and MACs need it: pass the model, "
                         f"fsg.summary(fsg.load_exported(path, model=MyNet()), input_size)")
    packed = {t: rec for rec in exp.layers for t in rec["tensors"].values()}
    binarized = {rec["name"]: rec for rec in exp.layers}
    modules: Dict[str, Dict[str, int]] = {}
    for name, t in exp.tensors.items():
        rec = packed.get(name)
        if rec is not None:
            modules.setdefault(rec["name"], {})
            continue
        module, _, leaf = name.rpartition(".")
        modules.setdefault(module, {})
        if leaf not in _BUFFER_NAMES:
            modules[module][leaf] = int(t.numel())
    rows: List[LayerSummary] = []
    natural = lambda n: [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in n.split(".")]  # noqa: E731
    for name in sorted(modules, key=natural):  # the file keeps no module order: name order, 10 after 9
        own = modules[name]
        rec = binarized.get(name)
        p1 = math.prod(int(d) for d in rec["shape"]) if rec is not None else 0
        p32 = sum(own.values())
        if rec is None and not own:
            continue  # buffers only
        bits = int(rec["bits"]) if rec is not None else None
        input_bits = (1 if rec.get("activations") else 32) if rec is not None else \
            (1 if name in exp.binary_activations else None)
        rows.append(LayerSummary(name=name, type="n/a", binarized=rec is not None,
                                 quantizer=None if rec is None else rec.get("quantizer"), bits=bits,
                                 input_bits=input_bits, params_1bit=p1, params_32bit=p32,
                                 memory_bytes=p1 * (bits or 1) / 8 + p32 * 4, macs=None))
    totals = _totals(rows)
    return ModelSummary(f"{where} (architecture not recorded: counted from the file's layer table)", None, rows,
                        totals, source={"exported": where, "arch": None, **{k: v for k, v in exp.source.items()
                                                                            if k != "checkpoint"}},
                        macs_note="MACs n/a, need the architecture (fsg.summary(fsg.load_exported(path, "
                                  "model=MyNet())))")
