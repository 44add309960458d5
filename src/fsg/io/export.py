"""Export a trained binary network as a compact, pickle-free file, and load it back.

``fsg export CHECKPOINT OUT`` / :func:`export_checkpoint` / :func:`export_model` write the
network with every binarized weight **bit-packed** (1 bit per weight plus one scale per layer)
and every other tensor (biases, BatchNorm weights and running statistics, layers kept in full
precision) at its own precision. :func:`load_exported` rebuilds a plain inference ``nn.Module``
from the file alone (for fsg's built-in models) or loads it into an architecture you pass.

File format (``fsg-binary``, version 1)
---------------------------------------
The file is a `safetensors <https://github.com/huggingface/safetensors>`_ file, written and
read with the ``safetensors`` package (``safetensors.torch.save`` / ``load``)::

    8 bytes         N, the header length, unsigned 64-bit little-endian
    N bytes         the header: UTF-8 JSON, padded with spaces to a multiple of 8 bytes
                    {"<tensor name>": {"dtype": "F32", "shape": [16, 3, 3, 3],
                                       "data_offsets": [begin, end]}, ...,
                     "__metadata__": {str: str}}
    rest            the data buffer: every tensor's raw little-endian bytes, C order, at
                    [begin, end) relative to the buffer's start, contiguous, no gaps

Tensor names are those of the unbinarized model's ``state_dict`` (``conv1.weight``,
``bn1.running_mean``, ...), except that a binarized weight ``L.weight`` is replaced by

* ``L.weight.bits`` (``U8``, ``ceil(n/8)`` bytes) and ``L.weight.scale`` (a scalar of the
  weight's dtype, ``F32`` for fsg's models): weight ``i`` (C order of the weight's shape) is bit
  ``i % 8`` of byte ``i // 8`` (least significant bit first: ``numpy.packbits(...,
  bitorder="little")``); bit 1 means ``+s``, bit 0 means ``-s``. Padding bits of the last byte
  are 0.
* for a k-bit layer (``dorefa`` with ``bits = k > 1``): ``L.weight.codes`` (``U8``,
  ``ceil(n·k/8)`` bytes), weight ``i`` having the k-bit code held by bits ``[i·k, (i+1)·k)`` of
  the same little-endian bit stream (its least significant bit first), and ``L.weight.levels``
  (the weight's dtype, at most ``2^k`` entries, ascending): the weight is ``levels[code]``.

``__metadata__`` (all values are strings; JSON where structured):

=======================  ===========================================================================
``format``               ``"fsg-binary"``
``format_version``       ``"1"``
``fsg_version``          the fsg that wrote the file
``arch``                 JSON ``{"name": "resnet20", "kwargs": {"num_classes": 10}}`` —
                         ``fsg.models.get_model(name, **kwargs)`` rebuilds the network (``activation``
                         appears when it is not ``relu``) — or ``null``
``layers``               JSON list, one entry per binarized layer: ``name`` (qualified module name),
                         ``shape``, ``quantizer``, ``bits``, ``activations`` (its input is binarized
                         with ``sign``, 1W1A), ``encoding`` (``"binary"`` or ``"levels"``),
                         ``dtype``, ``tensors`` (the names of its tensors in the file)
``binary_activations``   JSON list of the modules whose input goes through ``sign`` (``sign(0) = +1``)
``bit_order``            ``"little"``
``data_sha256``          SHA-256 of the data buffer (checked on load: corruption is detected)
``source``               JSON: where the weights came from (checkpoint, step, epoch, ...; informative)
=======================  ===========================================================================

The packed weights are exactly the weights evaluation uses: ``Ŵ`` is read from each layer's
parametrization under ``torch.no_grad()`` in eval mode, and each layer is *verified* before
anything is written: a 1-bit layer must satisfy ``|Ŵ| = s`` for one ``s > 0``, a k-bit layer
must take at most ``2^k`` distinct values, else :class:`ExportError` names the layer. The
dequantized weights are therefore bit-for-bit those of the trained model, and the rebuilt model's
outputs equal the trained model's evaluation outputs exactly.

Errors (a missing, truncated, corrupted or foreign file, a non-binary layer, an architecture that
does not fit) raise :class:`ExportError` (a ``ValueError``) with a one-line message, or
:class:`~fsg.train.checkpoint.CheckpointError` for an unusable training checkpoint. Files are written
atomically (temporary file, fsync, rename): an error never leaves a partial file behind.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from fsg.binarize import BinaryActivation, binarize, binarized_layers
from fsg.files import atomic_write
from fsg.models import MODELS, arch_spec, get_model, mismatch, model_spec
from fsg.train.checkpoint import CheckpointError, load_checkpoint

__all__ = [
    "FORMAT", "FORMAT_VERSION", "ExportError", "ExportedModel", "export_model", "export_checkpoint",
    "load_exported", "read_exported", "model_spec", "model_from_checkpoint", "write_safetensors",
    "read_safetensors", "pack_codes", "unpack_codes",
]

FORMAT = "fsg-binary"
FORMAT_VERSION = 1
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit

PathLike = Union[str, os.PathLike]


class ExportError(ValueError):
    """An export that cannot be written or read (one-line message)."""


# ----------------------------------------------------------------------------------------------
# safetensors layout

#: safetensors' dtype names (recorded per binarized layer in the ``layers`` metadata)
_DTYPE_NAMES: Dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


def _short(text: object, limit: int = 120) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _safetensors():
    """The ``safetensors`` package, imported on first use (so that ``import fsg`` and training
    work where it is missing, e.g. a GPU machine without a package registry); one-line
    :class:`ExportError` if it is not installed."""
    try:
        import safetensors
        import safetensors.torch
    except ImportError:
        raise ExportError("writing or reading an exported model needs the safetensors package: "
                          "pip install safetensors") from None
    return safetensors


def _data_start(blob: bytes) -> int:
    """Where the data buffer of a safetensors file starts: after the 8-byte header length and the header."""
    return 8 + int.from_bytes(blob[:8], "little")


def write_safetensors(path: PathLike, tensors: Dict[str, Tensor], metadata: Optional[Dict[str, str]] = None) -> Path:
    """Write ``tensors`` (name → tensor) and ``metadata`` (str → str) as a safetensors file
    (``safetensors.torch.save``), atomically. A ``data_sha256`` entry (SHA-256 of the data buffer)
    is added to the metadata. Raises :class:`ExportError` (one line)."""
    meta = dict(metadata or {})
    for k, v in meta.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ExportError(f"metadata must map strings to strings (entry {k!r})")
    for name, t in tensors.items():
        if t.dtype not in _DTYPE_NAMES:
            raise ExportError(f"tensor {name!r} has dtype {t.dtype}, which the file format cannot hold")
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    safetensors = _safetensors()
    try:
        # the data buffer does not depend on the metadata: hash it, then write it with its checksum
        first = safetensors.torch.save(tensors, meta)
        buffer = memoryview(first)[_data_start(first):]
        meta["data_sha256"] = hashlib.sha256(buffer).hexdigest()
        blob = safetensors.torch.save(tensors, meta)
    except (safetensors.SafetensorError, ValueError, RuntimeError) as e:
        raise ExportError(f"cannot write {str(path)!r}: {_short(e, 120)}") from None
    if memoryview(blob)[_data_start(blob):] != buffer:  # pragma: no cover - a safetensors invariant
        raise ExportError(f"cannot write {str(path)!r}: the data buffer changed with the metadata")
    return atomic_write(path, lambda f: f.write(blob))


def _diagnose(raw: bytes, where: str, error: Exception) -> ExportError:
    """A one-line error for a file ``safetensors`` refused: truncated, trailing bytes, a bad
    header, or (else) ``safetensors``' own reason."""
    if len(raw) < 8:
        return ExportError(f"{where} is truncated or not an exported model ({len(raw)} bytes)")
    n = int.from_bytes(raw[:8], "little")
    if n < 2 or n > MAX_HEADER:
        return ExportError(f"{where} is not an exported model (no safetensors header)")
    if 8 + n > len(raw):
        return ExportError(f"{where} is truncated (header of {n} bytes, file of {len(raw)})")
    try:
        header = json.loads(raw[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return ExportError(f"{where} is corrupted or not an exported model (bad header: {_short(e, 60)})")
    if not isinstance(header, dict):
        return ExportError(f"{where} is corrupted or not an exported model (the header is not a JSON object)")
    size = len(raw) - 8 - n
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        end = None
    if end is not None and end > size:
        return ExportError(f"{where} is truncated (its tensors end at byte {end} of a {size}-byte data buffer)")
    if end is not None and end < size:
        return ExportError(f"{where} is corrupted: {size - end} bytes after the last tensor")
    return ExportError(f"{where} is corrupted ({_short(error, 100)})")


def read_safetensors(path: PathLike, check_sum: bool = True) -> Tuple[Dict[str, Tensor], Dict[str, str]]:
    """Read a safetensors file: ``(tensors, metadata)``, with ``safetensors.torch.load``, which is
    strict (valid JSON header, every tensor's byte range matching its dtype and shape, the ranges
    tiling the data buffer exactly: a truncated file or trailing bytes are errors); when the
    metadata holds a ``data_sha256`` it must match (``check_sum``). Raises :class:`ExportError`
    (one line). Never unpickles anything."""
    p = Path(path)
    if not p.exists():
        raise ExportError(f"file not found: {str(p)!r}")
    if not p.is_file():
        raise ExportError(f"{str(p)!r} is not a file")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ExportError(f"cannot read {str(p)!r}: {e.strerror or e}") from None
    where = repr(str(p))
    if raw[:4] == b"PK\x03\x04":
        raise ExportError(f"{where} is a PyTorch zip file (a training checkpoint?), not an exported model: "
                          "run 'fsg export' on it first")
    safetensors = _safetensors()
    try:
        tensors = safetensors.torch.load(raw)
    except Exception as e:  # noqa: BLE001 - SafetensorError, or anything a malformed header raises
        raise _diagnose(raw, where, e) from None
    start = _data_start(raw)
    meta = json.loads(raw[8:start].decode("utf-8")).get("__metadata__") or {}  # validated by load
    if check_sum and "data_sha256" in meta and hashlib.sha256(memoryview(raw)[start:]).hexdigest() != meta["data_sha256"]:
        raise ExportError(f"{where} is corrupted: its data does not match the checksum in its header")
    return tensors, meta


# ----------------------------------------------------------------------------------------------
# bit packing


def pack_codes(codes: Tensor, k: int = 1) -> Tensor:
    """Pack non-negative integer ``codes`` (any shape, C order) of ``k`` bits each into a ``uint8``
    tensor: code ``i`` occupies bits ``[i·k, (i+1)·k)`` of a little-endian bit stream (bit ``j``
    is bit ``j % 8`` of byte ``j // 8``), its least significant bit first. For ``k = 1`` this is
    ``numpy.packbits(codes, bitorder="little")``."""
    c = codes.detach().reshape(-1).to(torch.int64).cpu().numpy()
    if k == 1:
        bits = c.astype(np.uint8)
    else:
        bits = ((c[:, None] >> np.arange(k, dtype=np.int64)) & 1).astype(np.uint8).reshape(-1)
    return torch.from_numpy(np.packbits(bits, bitorder="little"))


def unpack_codes(packed: Tensor, n: int, k: int = 1) -> Tensor:
    """Inverse of :func:`pack_codes`: the first ``n`` codes (``int64``) of ``k`` bits each."""
    buf = packed.detach().reshape(-1).cpu().numpy().astype(np.uint8, copy=False)
    bits = np.unpackbits(buf, count=n * k, bitorder="little")
    if k == 1:
        return torch.from_numpy(bits.astype(np.int64))
    codes = (bits.reshape(n, k).astype(np.int64) << np.arange(k, dtype=np.int64)).sum(1)
    return torch.from_numpy(codes)


# ----------------------------------------------------------------------------------------------
# architecture specs


def _check_spec(spec: Any, where: str) -> Dict[str, Any]:
    if not (isinstance(spec, dict) and isinstance(spec.get("name"), str) and isinstance(spec.get("kwargs", {}), dict)):
        raise ExportError(f"{where}: malformed architecture spec {_short(spec, 80)}")
    if spec["name"] not in MODELS:
        raise ExportError(f"{where}: architecture {spec['name']!r} is not an fsg built-in model "
                          f"({', '.join(MODELS)}): pass the architecture as model=")
    return {"name": spec["name"], "kwargs": dict(spec.get("kwargs", {}))}


def _build(spec: Dict[str, Any], where: str) -> nn.Module:
    spec = _check_spec(spec, where)
    try:
        return get_model(spec["name"], **spec["kwargs"])
    except (TypeError, ValueError) as e:
        raise ExportError(f"{where}: cannot build {spec['name']} with {spec['kwargs']}: {_short(e, 80)}") from None


_ORIGINAL = ".parametrizations.weight.original"


def _infer_spec(cfg, state: Dict[str, Tensor], where: str) -> Dict[str, Any]:
    """The architecture of a checkpoint without a ``model_spec`` entry: input channels from the
    first conv weight, classes from the last linear weight of the state dict."""
    weights = [v for k, v in state.items()
               if isinstance(v, Tensor) and (k.endswith(_ORIGINAL) or k == "weight" or k.endswith(".weight"))]
    convs = [w for w in weights if w.dim() >= 3]
    linears = [w for w in weights if w.dim() == 2]
    if not convs or not linears:
        raise CheckpointError(f"{where}: cannot infer the architecture (no conv or linear weight in the model state)")
    in_channels, classes = int(convs[0].shape[1]), int(linears[-1].shape[0])
    activation = getattr(cfg, "model_activation", None)
    if cfg.model == "small-cnn":
        return arch_spec("small-cnn", activation, in_channels=in_channels, num_classes=classes, width=cfg.width)
    if in_channels != 3:
        raise CheckpointError(f"{where}: {cfg.model} takes 3-channel images, the state has {in_channels}")
    kwargs: Dict[str, Any] = {"num_classes": classes}
    if not getattr(cfg, "classifier_bn", True):
        kwargs["classifier_bn"] = False
    return arch_spec(cfg.model, activation, **kwargs)


def model_from_checkpoint(checkpoint: PathLike) -> Tuple[nn.Module, Dict[str, Any]]:
    """The model of a training checkpoint (``last.pt`` or a run directory), rebuilt without its
    dataset and binarized as it was trained, in eval mode: ``(model, info)`` with ``info`` holding
    ``arch``, ``config``, ``step``, ``epoch``, ``checkpoint``. The architecture comes from the
    checkpoint's ``model_spec`` entry or, for checkpoints written before it existed, from the
    state dict's shapes (first conv's input channels, last linear's output features). Raises :class:`~fsg.train.checkpoint.CheckpointError`."""
    from fsg.train.config import TrainConfig

    path = Path(checkpoint)
    if path.is_dir():
        path = path / "last.pt"
    ckpt = load_checkpoint(path, mmap=True)  # only the model's tensors are read
    where = repr(str(path))
    try:
        cfg = TrainConfig.from_dict(ckpt["config"])
    except ValueError as e:
        raise CheckpointError(f"{where} holds an invalid configuration: {e}") from None
    state = ckpt["trainer"].get("model")
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{where} holds no model state")
    spec = ckpt.get("model_spec")
    if spec is None:
        spec = _infer_spec(cfg, state, where)
    try:
        spec = _check_spec(spec, where)
        model = _build(spec, where)
    except ExportError as e:
        raise CheckpointError(str(e)) from None
    if not cfg.full_precision:
        binarize(model, cfg.quantizer, bits=cfg.bits, keep_first=cfg.keep_first, keep_last=cfg.keep_last,
                 activations=cfg.activations)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{where}: the model state does not fit its configuration ({_short(e, 160)})") from None
    model.eval()
    info = {"arch": spec, "config": cfg.to_dict(), "step": int(ckpt["step"]), "epoch": int(ckpt["epoch"]),
            "checkpoint": str(path), "kind": ckpt.get("kind")}
    return model, info


# ----------------------------------------------------------------------------------------------
# export


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _binary_activation_modules(model: nn.Module) -> List[str]:
    return [name for name, m in model.named_modules()
            if any(isinstance(h, BinaryActivation) for h in m._forward_pre_hooks.values())]


def _quantize_layer(name: str, w: Tensor, bits: int, quantizer: str) -> Tuple[str, Dict[str, Tensor]]:
    """Verify ``w`` (= Ŵ) and encode it: ``("binary", {"bits", "scale"})`` or ``("levels", {"codes", "levels"})``."""
    label = name or "<root>"
    flat = w.detach().reshape(-1).cpu()
    if flat.numel() == 0:
        raise ExportError(f"layer {label!r} has no weights")
    if not torch.isfinite(flat).all():
        raise ExportError(f"layer {label!r}: its {quantizer} weights are not finite")
    if bits == 1:
        mags = flat.abs()
        s = mags[0]
        if not bool(s > 0) or not bool(torch.all(mags == s)):
            distinct = torch.unique(mags).numel()
            raise ExportError(f"layer {label!r} is not binary: its {quantizer} weights take {distinct} distinct "
                              f"magnitude(s), not one s > 0 (|Ŵ| in [{mags.min().item():.4g}, {mags.max().item():.4g}])")
        return "binary", {"bits": pack_codes(flat > 0, 1), "scale": s.clone()}
    levels, codes = torch.unique(flat, sorted=True, return_inverse=True)
    if levels.numel() > 2 ** bits:
        raise ExportError(f"layer {label!r} is not {bits}-bit: its {quantizer} weights take {levels.numel()} "
                          f"distinct values, more than 2^{bits}")
    return "levels", {"codes": pack_codes(codes, bits), "levels": levels.clone()}


def _exported_tensors(model: nn.Module) -> Tuple[Dict[str, Tensor], List[Dict[str, Any]], List[str]]:
    """(tensors, layer records, canonical state-dict names) of ``model`` — read only."""
    layers = {l.name: l for l in binarized_layers(model)}
    hooked = set(_binary_activation_modules(model))
    tensors: Dict[str, Tensor] = {}
    records: List[Dict[str, Any]] = []
    canonical: List[str] = []
    modules = dict(model.named_modules())
    done = set()
    for key, value in model.state_dict(keep_vars=False).items():
        parts = key.split(".")
        if "parametrizations" in parts:
            i = parts.index("parametrizations")
            owner, attr = ".".join(parts[:i]), parts[i + 1]
            canon = _join(owner, attr)
            if canon in done:
                continue
            done.add(canon)
            canonical.append(canon)
            module = modules[owner]
            value = getattr(module, attr)  # Ŵ as evaluation computes it (no_grad, eval mode: see caller)
            if attr == "weight" and owner in layers:
                q = layers[owner].quantizer
                bits = int(getattr(q, "bits", 1))
                qname = getattr(q, "name", "") or type(q).__name__
                encoding, enc = _quantize_layer(owner, value, bits, qname)
                names = {}
                for part, t in enc.items():
                    tensors[f"{canon}.{part}"] = t
                    names[part] = f"{canon}.{part}"
                records.append({"name": owner, "shape": list(value.shape), "quantizer": qname, "bits": bits,
                                "activations": owner in hooked, "encoding": encoding,
                                "dtype": _DTYPE_NAMES.get(value.dtype, str(value.dtype)), "tensors": names})
                continue
        else:
            canon = key
            canonical.append(canon)
        tensors[canon] = value.detach().cpu().clone()
    return tensors, records, canonical


def export_model(model: nn.Module, path: PathLike, *, arch: Union[str, Dict[str, Any], None] = "auto",
                 source: Optional[Dict[str, Any]] = None) -> Path:
    """Write ``model`` (binarized with :func:`fsg.binarize`, or not) to ``path`` in the
    ``fsg-binary`` format (see the module docstring); returns the path.

    ``arch``: the architecture spec stored in the file (``{"name": ..., "kwargs": {...}}`` for
    :func:`fsg.models.get_model`), ``"auto"`` (:func:`model_spec`: fsg's built-in models) or
    ``None`` (then :func:`load_exported` needs the architecture as ``model=``). ``source``:
    informative JSON-able details stored as the ``source`` metadata entry.

    ``model`` is not modified (its layers' training flags are restored; ``Ŵ`` is read under
    ``torch.no_grad()``, which records nothing for the trainer). Raises :class:`ExportError` when
    a binarized layer is not exactly binary (k-bit), naming it; nothing is written then.
    """
    from fsg import __version__

    if not isinstance(model, nn.Module):
        raise ExportError(f"export_model needs an nn.Module, got {type(model).__name__}")
    if arch == "auto":
        arch = model_spec(model)
    elif arch is not None:
        arch = _check_spec(arch, "arch")
    out = Path(path)
    if out.is_dir():
        raise ExportError(f"output {str(out)!r} is a directory: give a file name (e.g. model.safetensors)")
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            tensors, records, _ = _exported_tensors(model)
    finally:
        for m, training in modes.items():
            m.training = training
    metadata = {
        "format": FORMAT, "format_version": str(FORMAT_VERSION), "fsg_version": str(__version__),
        "arch": json.dumps(arch), "layers": json.dumps(records),
        "binary_activations": json.dumps(_binary_activation_modules(model)), "bit_order": "little",
        "source": json.dumps(source or {}, default=str),
    }
    return write_safetensors(out, tensors, metadata)


def export_checkpoint(checkpoint: PathLike, path: PathLike) -> Path:
    """Export the model of a training checkpoint (``last.pt`` or a run directory) to ``path``;
    no dataset needed (:func:`model_from_checkpoint`). Returns the path. Raises
    :class:`~fsg.train.checkpoint.CheckpointError` for an unusable checkpoint and :class:`ExportError`
    for a non-binary layer or a bad output path."""
    src = Path(checkpoint)
    ck = src / "last.pt" if src.is_dir() else src
    out = Path(path)
    if out.exists() and ck.exists() and out.resolve() == ck.resolve():
        raise ExportError(f"the output {str(out)!r} is the checkpoint itself: choose another file name")
    model, info = model_from_checkpoint(ck)
    cfg = info["config"]
    source = {"checkpoint": str(ck), "step": info["step"], "epoch": info["epoch"], "kind": info["kind"],
              "estimator": cfg.get("estimator"), "quantizer": cfg.get("quantizer"), "bits": cfg.get("bits"),
              "dataset": cfg.get("dataset")}
    return export_model(model, out, arch=info["arch"], source=source)


# ----------------------------------------------------------------------------------------------
# reading


@dataclass
class ExportedModel:
    """The content of an exported file (:func:`read_exported`)."""

    path: Path
    arch: Optional[Dict[str, Any]]
    layers: List[Dict[str, Any]]              # one record per binarized layer (see the module doc)
    binary_activations: List[str]             # modules whose input goes through sign
    tensors: Dict[str, Tensor]                # as stored (packed bits, scales, float tensors)
    metadata: Dict[str, str] = field(default_factory=dict)

    @property
    def source(self) -> Dict[str, Any]:
        try:
            return json.loads(self.metadata.get("source", "{}")) or {}
        except json.JSONDecodeError:
            return {}

    def state_dict(self) -> Dict[str, Tensor]:
        """The plain (unbinarized-architecture) ``state_dict``, binarized weights dequantized."""
        packed = set()
        out: Dict[str, Tensor] = {}
        for rec in self.layers:
            canon = _join(rec["name"], "weight")
            shape = tuple(rec["shape"])
            n = math.prod(shape)
            t = rec["tensors"]
            if rec["encoding"] == "binary":
                s = self.tensors[t["scale"]]
                bits = unpack_codes(self.tensors[t["bits"]], n, 1).to(torch.bool)
                w = torch.where(bits, s, -s)
            else:
                levels = self.tensors[t["levels"]]
                codes = unpack_codes(self.tensors[t["codes"]], n, int(rec["bits"]))
                w = levels[codes]
            out[canon] = w.reshape(shape).contiguous()
            packed.update(t.values())
        for name, v in self.tensors.items():
            if name not in packed:
                out[name] = v
        return out


def read_exported(path: PathLike) -> ExportedModel:
    """Read and validate an ``fsg-binary`` file (no model is built). Raises :class:`ExportError`."""
    p = Path(path)
    tensors, meta = read_safetensors(p)
    where = repr(str(p))
    if meta.get("format") != FORMAT:
        raise ExportError(f"{where} is a safetensors file but not an fsg export (format {meta.get('format')!r})")
    try:
        version = int(meta.get("format_version", ""))
    except ValueError:
        raise ExportError(f"{where}: unknown format version {meta.get('format_version')!r}") from None
    if version > FORMAT_VERSION:
        raise ExportError(f"{where} was written by a newer fsg (format {version}, this fsg reads up to {FORMAT_VERSION})")
    try:
        arch = json.loads(meta.get("arch", "null"))
        layers = json.loads(meta.get("layers", "[]"))
        hooked = json.loads(meta.get("binary_activations", "[]"))
    except json.JSONDecodeError as e:
        raise ExportError(f"{where} is corrupted: bad metadata ({_short(e, 60)})") from None
    if meta.get("bit_order", "little") != "little":
        raise ExportError(f"{where}: unsupported bit order {meta.get('bit_order')!r}")
    if not isinstance(layers, list) or not isinstance(hooked, list) or not all(isinstance(h, str) for h in hooked):
        raise ExportError(f"{where} is corrupted: malformed layer list")
    for rec in layers:
        try:
            name, shape, bits, enc, names = rec["name"], rec["shape"], int(rec["bits"]), rec["encoding"], rec["tensors"]
            n = math.prod(int(d) for d in shape)
            parts = {"binary": ("bits", "scale"), "levels": ("codes", "levels")}[enc]
            packed, values = (tensors[names[k]] for k in parts)
        except (KeyError, TypeError, ValueError):
            raise ExportError(f"{where} is corrupted: malformed record or missing tensor for layer "
                              f"{rec.get('name') if isinstance(rec, dict) else rec!r}") from None
        label = name or "<root>"
        if packed.dtype != torch.uint8 or packed.numel() != (n * bits + 7) // 8:
            raise ExportError(f"{where} is corrupted: layer {label!r} needs {(n * bits + 7) // 8} packed bytes, "
                              f"has {packed.numel()}")
        if not values.is_floating_point() or (enc == "binary" and values.numel() != 1) or \
                (enc == "levels" and not 1 <= values.numel() <= 2 ** bits):
            raise ExportError(f"{where} is corrupted: bad scale/levels for layer {label!r}")
        if enc == "levels":
            codes = unpack_codes(packed, n, bits)
            if n and int(codes.max()) >= values.numel():
                raise ExportError(f"{where} is corrupted: layer {label!r} has codes beyond its level table")
    return ExportedModel(p, arch, layers, hooked, tensors, meta)


def _load_into(model: nn.Module, state: Dict[str, Tensor], where: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    bad = [f"{k} (file {tuple(state[k].shape)}, model {tuple(own[k].shape)})"
           for k in own if k in state and state[k].shape != own[k].shape]
    problems = mismatch(missing, unexpected, bad)
    if problems:
        raise ExportError(f"{where} does not fit {type(model).__name__}: {problems}")
    model.load_state_dict(state)


def _sign_hook(name: str) -> BinaryActivation:
    try:
        return BinaryActivation(name)  # type: ignore[call-arg]  # the hook names its layer in warnings
    except TypeError:  # pragma: no cover - a hook class without a name
        return BinaryActivation()


def load_exported(path: PathLike, model: Optional[nn.Module] = None) -> nn.Module:
    """An inference model from an exported file: a plain ``nn.Module`` (no parametrizations) with
    the dequantized binary weights (exactly ``±s``), every other tensor as trained, the ``sign``
    input pre-hooks of 1W1A layers re-registered, in eval mode.

    ``model=None`` builds the architecture recorded in the file (fsg's built-in models);
    otherwise the weights are loaded into ``model`` (a plain, unbinarized architecture with the
    same ``state_dict`` names), in place, and it is returned. Reads with no ``torch.load``.
    Raises :class:`ExportError` (one line) for a bad file or an architecture that does not fit.
    """
    exp = read_exported(path)
    where = repr(str(exp.path))
    if model is None:
        if exp.arch is None:
            raise ExportError(f"{where} records no built-in architecture: pass the model, load_exported(path, model=...)")
        model = _build(exp.arch, where)
    elif not isinstance(model, nn.Module):
        raise ExportError(f"model must be an nn.Module, got {type(model).__name__}")
    elif any(parametrize.is_parametrized(m) for m in model.modules()):
        raise ExportError(f"{type(model).__name__} has parametrizations (binarized?): pass the plain, "
                          "unbinarized architecture")
    _load_into(model, exp.state_dict(), where)
    modules = dict(model.named_modules())
    for name in exp.binary_activations:
        if name not in modules:
            raise ExportError(f"{where}: module {name!r} (binarized input) is not in {type(model).__name__}")
        m = modules[name]
        if not any(isinstance(h, BinaryActivation) for h in m._forward_pre_hooks.values()):
            m.register_forward_pre_hook(_sign_hook(name))
    return model.eval()
