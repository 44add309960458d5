"""Swappable scan backends: the interface, the registry, the selection and the dispatchers.

A :class:`Backend` names a set of implementations of the state-space operations:

* ``selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
  return_last_state=False, initial_state=None)``: the signature and semantics of
  :func:`fsg.ssm.reference.selective_scan_ref` (the ``mamba_ssm`` layouts);
* ``causal_conv1d(x, weight, bias, silu)``: :func:`fsg.ssm.reference.causal_conv1d`; it may
  return None to decline particular inputs;
* ``mamba_low_memory(block, x)``: ``block(x)`` for a Mamba block, keeping (almost) no activations
  for the backward pass; may return None to decline;
* ``resets``: a ``selective_scan`` or ``mamba_low_memory`` op that carries the attribute
  ``supports_resets = True`` also takes ``resets=`` (batch, L) bool, the tokens where the state
  restarts (several sequences packed in a row: :mod:`fsg.ssm.packing`); for the others such a
  call goes to the reference scan (checkpointed, for the block);
* ``selective_scan_step(..., last_out=None)``: the scan continued from ``initial_state`` by a few
  tokens (streaming), allowed to write the new state into the free float32 buffer ``last_out``
  (batch, d_inner, d_state) instead of allocating one. An op that also stores the state in 16 bits
  itself takes ``state_dtype=`` and carries the attribute ``supports_state_dtype = True``;
* ``mamba_stream(block, window, h, state_dtype, in_place=False, state_buffer=None)``:
  :meth:`fsg.ssm.mamba.Mamba.stream`'s step keeping no activations for the backward pass (see
  :func:`mamba_stream`); may return None to decline.

An operation a backend leaves as None (or declines) falls back to the reference for that
operation: :func:`~fsg.ssm.reference.selective_scan_ref`, ``F.conv1d``
(:func:`~fsg.ssm.reference.causal_conv1d`), ``torch.utils.checkpoint`` of
``block.plain_forward`` for the low-memory block (which then runs the backend's own scan and conv
in the recomputation), the backend's own ``selective_scan`` for the streaming step (the buffer
is then unused; a 16-bit ``state_dtype`` is then emulated: the stored state widened, the new one
rounded), and :meth:`~fsg.ssm.mamba.Mamba.stream`'s ordinary autograd path for ``mamba_stream``.

``block`` (for ``mamba_low_memory``) is an :class:`fsg.ssm.mamba.Mamba`; backends use only its public
attributes (``d_model``, ``d_inner``, ``d_state``, ``d_conv``, ``dt_rank``, ``in_proj``,
``conv1d``, ``x_proj``, ``dt_proj``, ``A_log``, ``D``, ``out_proj``) and methods
(``pre_scan_parts(x)``, ``pre_scan(x)``, ``plain_forward(x)``); the backends never import
:mod:`fsg.ssm.mamba`.

Selection: :func:`set_backend` / :func:`use_backend` choose a registered backend by name, or
``"auto"`` (the default), which picks for the tensors' device the available backend of highest
``priority`` among those declaring that device: on CUDA ``mamba_ssm`` (30), then ``triton`` (20);
on the CPU ``cpu`` (the C kernels, 10). When none is available ``auto`` uses the reference (on
CUDA with a one-time warning saying what to install). An explicit choice that cannot serve the
tensors' device, or is not available here, raises a one-line ValueError.

Built-in backends:

* ``"reference"``: plain PyTorch, any device (a Python loop over time; slow for long sequences).
* ``"cpu"``: the compiled C kernels of :mod:`fsg.ssm.cpu` (scan, conv, low-memory block, streaming
  step with ``last_out`` and a 16-bit ``state_dtype``, and ``mamba_stream``: the low-memory,
  in-place streaming step); available when they build (a C compiler, no ``FSG_NO_COMPILE=1``).
  float64 inputs go to the reference inside its ops.
* ``"mamba_ssm"``: ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn`` (CUDA), imported
  lazily. Its kernel has no initial state and only float32/float16/bfloat16 inputs with a float32
  ``A``: a scan with ``initial_state`` (streaming) or other dtypes is computed by the reference
  instead (same semantics). No conv or low-memory op (reference conv, checkpointed block).
* ``"triton"``: :func:`fsg.ssm.triton_scan.selective_scan_triton` (CUDA) and the low-memory block
  (:class:`fsg.ssm.lowmem.MambaLowMemory` on its kernels), imported lazily; not available (with the
  import error as reason) while that module or Triton is missing.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, Iterable, Iterator, List, Optional, Union

import torch
import torch.utils.checkpoint
from torch import Tensor

from fsg.ssm import cpu as _cpu
from fsg.ssm.reference import causal_conv1d as causal_conv1d_ref
from fsg.ssm.reference import check_conv_shapes, compute_dtype, selective_scan_ref

__all__ = [
    "AUTO",
    "Backend",
    "register_backend",
    "unregister_backend",
    "get_backend",
    "list_backends",
    "set_backend",
    "use_backend",
    "current_backend",
    "select_backend",
    "selective_scan",
    "selective_scan_step",
    "causal_conv1d",
    "mamba_low_memory",
    "mamba_stream",
    "supports_resets",
]

#: The selection name that picks a backend per device.
AUTO = "auto"

_OPS = ("selective_scan", "causal_conv1d", "mamba_low_memory", "selective_scan_step", "mamba_stream")


@dataclass(eq=False)
class Backend:
    """A named set of state-space operation implementations (see the module docstring).

    ``devices``: the ``torch.device`` types it runs on (e.g. ``{"cpu"}``, ``{"cuda"}``); None: any.
    ``priority``: rank for ``"auto"`` among the available backends of a device (higher first);
    None: never picked by ``"auto"``, only by name. ``check_available``: returns None when the
    backend can run here, else a one-line reason (None: always available).
    """

    name: str
    devices: Optional[Iterable[str]] = None
    selective_scan: Optional[Callable] = None
    causal_conv1d: Optional[Callable] = None
    mamba_low_memory: Optional[Callable] = None
    selective_scan_step: Optional[Callable] = None
    priority: Optional[int] = None
    check_available: Optional[Callable[[], Optional[str]]] = None
    description: str = ""
    mamba_stream: Optional[Callable] = None  # last, so that positional construction is unchanged

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"backend name must be a non-empty string, got {self.name!r}")
        if self.name == AUTO:
            raise ValueError(f"{AUTO!r} is reserved for the per-device selection; choose another backend name")
        if self.devices is not None:
            if isinstance(self.devices, str):
                self.devices = (self.devices,)
            self.devices = frozenset(str(d) for d in self.devices)
        for op in _OPS + ("check_available",):
            fn = getattr(self, op)
            if fn is not None and not callable(fn):
                raise ValueError(f"backend {self.name!r}: {op} must be callable or None, got {type(fn).__name__}")
        if self.priority is not None and (isinstance(self.priority, bool) or not isinstance(self.priority, int)):
            raise ValueError(f"backend {self.name!r}: priority must be an int or None, got {self.priority!r}")

    def supports(self, device: Union[str, torch.device]) -> bool:
        """Whether it runs on tensors of ``device`` (a type such as ``"cuda"`` or a device)."""
        return self.devices is None or _device_type(device) in self.devices

    def unavailable_reason(self) -> Optional[str]:
        """None when the backend can run here, else one line saying why not."""
        if self.check_available is None:
            return None
        try:
            return self.check_available()
        except Exception as e:  # noqa: BLE001 - a failing check means "not available"
            return f"availability check failed: {type(e).__name__}: {e}"

    def available(self) -> bool:
        """True when the backend can run here (see :meth:`unavailable_reason`)."""
        return self.unavailable_reason() is None

    def devices_text(self) -> str:
        return "any device" if self.devices is None else ", ".join(sorted(self.devices))


def _device_type(device: Union[str, torch.device]) -> str:
    if isinstance(device, torch.device):
        return device.type
    return torch.device(device).type


# ---------------------------------------------------------------------------
# Registry and selection
# ---------------------------------------------------------------------------

_REGISTRY: Dict[str, Backend] = {}
_selected: str = AUTO
_warned: set = set()  # devices for which "auto" has warned that it falls back to the reference


def register_backend(backend: Backend) -> Backend:
    """Add ``backend`` to the registry (replacing one of the same name); returns it."""
    if not isinstance(backend, Backend):
        raise ValueError(f"register_backend expects a fsg.ssm.Backend, got {type(backend).__name__}")
    _REGISTRY[backend.name] = backend
    return backend


def unregister_backend(name: str) -> None:
    """Remove the backend ``name``; if it was selected, the selection returns to ``"auto"``."""
    global _selected
    get_backend(name)  # the unknown-name error
    del _REGISTRY[name]
    if _selected == name:
        _selected = AUTO


def _choices() -> str:
    return ", ".join(repr(n) for n in [AUTO] + list_backends())


def get_backend(name: str) -> Backend:
    """The registered backend ``name`` (ValueError listing the choices if there is none)."""
    backend = _REGISTRY.get(name)
    if backend is None:
        if name == AUTO:
            raise ValueError(f"{AUTO!r} is a selection, not a backend; select_backend(device) gives the one it picks")
        raise ValueError(f"unknown scan backend {name!r}; choose one of: {_choices()}")
    return backend


def list_backends() -> List[str]:
    """Names of the registered backends, sorted."""
    return sorted(_REGISTRY)


def set_backend(name: str) -> None:
    """Select the backend ``name`` (or ``"auto"``) for every scan, conv, low-memory block and stream."""
    global _selected
    if name != AUTO:
        get_backend(name)
    _selected = name


def current_backend() -> str:
    """The selected name: ``"auto"`` or a registered backend (see :func:`select_backend`)."""
    return _selected


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager selecting ``name``, restoring the previous selection on exit."""
    previous = _selected
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous if (previous == AUTO or previous in _REGISTRY) else AUTO)


def _reference() -> Backend:
    return _REGISTRY.get("reference", REFERENCE)


def select_backend(device: Union[str, torch.device]) -> Backend:
    """The backend the current selection uses for tensors on ``device``.

    An explicit selection is returned if it supports ``device`` and is available, else a one-line
    ValueError says what is wrong and how to fix it. ``"auto"``: the available backend of highest
    priority among those supporting ``device``, else the reference (warning once on CUDA).
    """
    dev = _device_type(device)
    name = _selected
    if name != AUTO:
        backend = _REGISTRY.get(name)
        if backend is None:  # unregistered behind our back
            raise ValueError(f"the selected scan backend {name!r} is no longer registered; choose one of: {_choices()}")
        if not backend.supports(dev):
            raise ValueError(
                f"scan backend {name!r} cannot run on {dev} tensors (it supports {backend.devices_text()}); "
                f"select one that can with fsg.ssm.set_backend(...), e.g. 'auto'")
        reason = backend.unavailable_reason()
        if reason is not None:
            raise ValueError(
                f"scan backend {name!r} is not available here ({reason}); "
                f"select another with fsg.ssm.set_backend(...), e.g. 'auto'")
        return backend
    candidates = [b for b in _REGISTRY.values() if b.priority is not None and b.supports(dev)]
    candidates.sort(key=lambda b: -b.priority)  # stable: registration order among equals
    skipped = []
    for backend in candidates:
        reason = backend.unavailable_reason()
        if reason is None:
            return backend
        skipped.append(backend.name)
    if dev == "cuda" and dev not in _warned:
        _warned.add(dev)
        why = f"not available: {', '.join(skipped)}" if skipped else "none registered"
        warnings.warn(
            f"fsg.ssm: no fast selective-scan backend for CUDA tensors ({why}); using the slow Python-loop "
            f"reference scan - pip install mamba-ssm (or triton) for a fast one",
            RuntimeWarning, stacklevel=3)
    return _reference()


# ---------------------------------------------------------------------------
# Dispatchers
# ---------------------------------------------------------------------------


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                   z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                   return_last_state: bool = False, initial_state: Optional[Tensor] = None,
                   resets: Optional[Tensor] = None):
    """Selective scan through the backend selected for ``u``'s device; same signature and
    semantics as :func:`fsg.ssm.reference.selective_scan_ref`. ``resets`` (batch, L) bool: the
    state restarts at the True tokens (several sequences packed in a row, see
    :mod:`fsg.ssm.packing`); run by the backend's op where it carries ``supports_resets``
    (:func:`supports_resets`), else by the reference."""
    fn = select_backend(u.device).selective_scan or selective_scan_ref
    kwargs = dict(D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                  return_last_state=return_last_state, initial_state=initial_state)
    if resets is not None:
        fn = fn if getattr(fn, "supports_resets", False) else selective_scan_ref
        kwargs["resets"] = resets
    return fn(u, delta, A, B, C, **kwargs)


def supports_resets(device: Union[str, torch.device]) -> bool:
    """Whether the backend selected for ``device`` scans with ``resets`` in its own kernels (its
    ``selective_scan`` op carries ``supports_resets = True``; the reference's does), rather than
    falling back to the reference (a Python loop over time): where it does, packing several
    sequences in one call pays (:mod:`fsg.ssm.packing`)."""
    return bool(getattr(select_backend(device).selective_scan or selective_scan_ref, "supports_resets", False))


def selective_scan_step(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                        z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                        return_last_state: bool = False, initial_state: Optional[Tensor] = None,
                        last_out: Optional[Tensor] = None, state_dtype: Optional[torch.dtype] = None):
    """:func:`selective_scan` for streaming: the backend's ``selective_scan_step`` may write the
    new last state into ``last_out`` (a free ``(batch, d_inner, d_state)`` tensor of the state
    dtype, not referenced by anything still needed); without that op, the backend's scan (buffer
    unused).

    ``state_dtype`` (None: the compute dtype, float32, as before): the dtype the returned last
    state is stored in; ``torch.bfloat16`` / ``torch.float16`` halve it. Semantics, whichever
    backend: the arithmetic is float32 (the compute dtype); ``initial_state`` is read as stored
    (widened exactly), ``y`` comes from the unrounded states, and the last state is rounded to
    nearest even, ``h_last.to(state_dtype)``. Ops with ``supports_state_dtype`` (the ``"cpu"``
    backend's) do this without widening the whole state; for the others it is emulated around
    their scan."""
    backend = select_backend(u.device)
    kwargs = dict(D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                  return_last_state=return_last_state, initial_state=initial_state)
    op = backend.selective_scan_step
    if state_dtype == compute_dtype(u.dtype) and (initial_state is None or initial_state.dtype == state_dtype):
        state_dtype = None  # nothing to widen or round: the plain step (which honours last_out everywhere)
    if state_dtype is not None:
        if op is not None and getattr(op, "supports_state_dtype", False):
            return op(u, delta, A, B, C, last_out=last_out, state_dtype=state_dtype, **kwargs)
        if initial_state is not None:
            kwargs["initial_state"] = initial_state.to(compute_dtype(u.dtype))
        kwargs["return_last_state"] = True
        if op is not None:
            y, last = op(u, delta, A, B, C, last_out=None, **kwargs)
        else:
            y, last = (backend.selective_scan or selective_scan_ref)(u, delta, A, B, C, **kwargs)
        last = last.to(state_dtype)
        return (y, last) if return_last_state else y
    if op is not None:
        return op(u, delta, A, B, C, last_out=last_out, **kwargs)
    return (backend.selective_scan or selective_scan_ref)(u, delta, A, B, C, **kwargs)


def causal_conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, silu: bool = False) -> Tensor:
    """Causal depthwise 1-D convolution over the last axis, then SiLU if ``silu``, through the
    backend selected for ``x``'s device (see :func:`fsg.ssm.reference.causal_conv1d` for the
    definition and layouts: ``x`` (batch, channels, L), ``weight`` (channels, d_conv),
    ``bias`` (channels,) or None)."""
    check_conv_shapes(x, weight, bias)
    op = select_backend(x.device).causal_conv1d
    if op is not None:
        out = op(x, weight, bias, silu)
        if out is not None:
            return out
    return causal_conv1d_ref(x, weight, bias, silu)


def mamba_stream(block, window: Tensor, h: Optional[Tensor], state_dtype: torch.dtype, in_place: bool = False,
                 state_buffer: Optional[Tensor] = None):
    """The step of :meth:`fsg.ssm.mamba.Mamba.stream` (``low_memory=True``) through the backend's
    ``mamba_stream`` op, or None when the backend has none or it declines (the caller then runs
    the ordinary autograd path).

    ``window`` = ``[x_hist, x]`` (B, d_conv − 1 + T_new, d_model), ``h`` the old scan state
    (``state_dtype``, or None at the start). Returns ``(out, h_new, finish)``: ``out`` (B, T_new,
    d_model) differentiable w.r.t. ``window`` and the block's parameters, with only ``window``
    kept for the backward pass; ``h_new`` the new state (``state_dtype``; written into
    ``state_buffer`` if given and suitable); with ``in_place`` ``h_new`` is ``h`` itself, updated
    no later than ``finish()`` (None when nothing is pending) — see :meth:`fsg.ssm.mamba.Mamba.stream`."""
    op = select_backend(window.device).mamba_stream
    if op is None:
        return None
    return op(block, window, h, state_dtype, in_place=in_place, state_buffer=state_buffer)


def mamba_low_memory(block, x: Tensor, resets: Optional[Tensor] = None) -> Tensor:
    """``block(x)`` keeping (almost) no activations for the backward: the backend's
    ``mamba_low_memory`` op, else ``torch.utils.checkpoint`` of ``block.plain_forward``.
    ``resets`` (see :func:`selective_scan`) go to an op carrying ``supports_resets``; with another
    op the block is checkpointed."""
    op = select_backend(x.device).mamba_low_memory
    if op is not None and (resets is None or getattr(op, "supports_resets", False)):
        out = op(block, x) if resets is None else op(block, x, resets=resets)
        if out is not None:
            return out
    return torch.utils.checkpoint.checkpoint(block.plain_forward, x, resets, use_reentrant=False)


# ---------------------------------------------------------------------------
# Built-in backends
# ---------------------------------------------------------------------------


def _cpu_unavailable() -> Optional[str]:
    # looked up on the module at call time (tests monkeypatch fsg.ssm.cpu.available)
    if _cpu.available():
        return None
    return _cpu.build_error() or "the C kernels could not be built"


_UNSET = object()
_lazy: Dict[str, object] = {}  # import name -> the imported function, or the error text


def _lazy_import(key: str, importer: Callable[[], Callable]):
    """``(fn, None)`` or ``(None, reason)``; the import is tried once."""
    got = _lazy.get(key, _UNSET)
    if got is _UNSET:
        try:
            got = importer()
        except ModuleNotFoundError as e:
            got = f"no module named {e.name!r}" if e.name else str(e).splitlines()[0]
        except Exception as e:  # noqa: BLE001 - e.g. built against another CUDA/torch
            got = f"{type(e).__name__}: {e}".splitlines()[0]
        _lazy[key] = got
    return (None, got) if isinstance(got, str) else (got, None)


def _import_mamba_ssm():
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    return selective_scan_fn


def _mamba_ssm_unavailable() -> Optional[str]:
    _, err = _lazy_import("mamba_ssm", _import_mamba_ssm)
    return None if err is None else f"cannot import mamba_ssm ({err}); pip install mamba-ssm"


def _mamba_ssm_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                    return_last_state=False, initial_state=None):
    """``mamba_ssm``'s CUDA ``selective_scan_fn``; the reference where that kernel does not apply
    (an ``initial_state``, i.e. streaming; float64; a non-float32 ``A``)."""
    if (initial_state is None and u.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and A.dtype == torch.float32):
        fn, err = _lazy_import("mamba_ssm", _import_mamba_ssm)
        if fn is None:
            raise RuntimeError(f"mamba_ssm backend: {err}")
        return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    return selective_scan_ref(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                              return_last_state=return_last_state, initial_state=initial_state)


def _import_triton():
    from fsg.ssm.triton_scan import selective_scan_triton

    return selective_scan_triton


def _triton_unavailable() -> Optional[str]:
    _, err = _lazy_import("triton", _import_triton)
    if err is None:
        return None
    if "'fsg.ssm.triton_scan'" in err:
        return "fsg.ssm.triton_scan is not part of this installation"
    return f"cannot import fsg.ssm.triton_scan ({err})" + ("; pip install triton" if "'triton" in err else "")


def _triton_scan(*args, **kwargs):
    fn, err = _lazy_import("triton", _import_triton)
    if fn is None:
        raise RuntimeError(f"triton backend: {err}")
    return fn(*args, **kwargs)


def _triton_low_memory(block, x, resets=None):
    if _lazy_import("triton", _import_triton)[0] is None:
        return None  # a checkpointed block then
    from fsg.ssm.triton_scan import mamba_low_memory_triton

    return mamba_low_memory_triton(block, x, resets=resets)


# the ops whose own kernels take resets= (the reference's loop, the Triton kernels)
selective_scan_ref.supports_resets = True  # type: ignore[attr-defined]
_triton_scan.supports_resets = _triton_low_memory.supports_resets = True  # type: ignore[attr-defined]


def _triton_stream(block, window, h, state_dtype, in_place=False, state_buffer=None):
    if _lazy_import("triton", _import_triton)[0] is None:
        return None  # the ordinary autograd path then
    from fsg.ssm.triton_stream import mamba_stream_triton

    return mamba_stream_triton(block, window, h, state_dtype, in_place=in_place, state_buffer=state_buffer)


REFERENCE = register_backend(Backend(
    "reference", devices=None, selective_scan=selective_scan_ref, causal_conv1d=causal_conv1d_ref,
    description="plain PyTorch, any device; a Python loop over time (slow for long sequences)"))

CPU = register_backend(Backend(
    "cpu", devices={"cpu"}, selective_scan=_cpu.selective_scan_fused, causal_conv1d=_cpu.causal_conv1d_fused,
    mamba_low_memory=_cpu.mamba_low_memory, selective_scan_step=_cpu.selective_scan_step, priority=10,
    check_available=_cpu_unavailable, mamba_stream=_cpu.mamba_stream,
    description="compiled C kernels (fsg.ssm.cpu): fused, memory-bounded scan, conv, low-memory block and "
                "streaming step (16-bit state, in place)"))

MAMBA_SSM = register_backend(Backend(
    "mamba_ssm", devices={"cuda"}, selective_scan=_mamba_ssm_scan, priority=30,
    check_available=_mamba_ssm_unavailable,
    description="mamba_ssm's CUDA selective_scan_fn (reference for initial_state / float64)"))

TRITON = register_backend(Backend(
    "triton", devices={"cuda"}, selective_scan=_triton_scan, selective_scan_step=_triton_scan, priority=20,
    mamba_low_memory=_triton_low_memory, check_available=_triton_unavailable, mamba_stream=_triton_stream,
    # selective_scan_triton takes `last_out` (streaming: one launch writes the new state there);
    # the low-memory block is fsg.ssm.lowmem's on scan_forward / scan_backward with the rank-1
    # delta / z factors; the one-token streaming step of FSG's slow-net is one kernel each way
    # (fsg.ssm.triton_stream). The conv is PyTorch's conv1d (the reference conv).
    description="Triton selective scan kernels (fsg.ssm.triton_scan), low-memory block and streaming block step "
                "(fsg.ssm.triton_stream, 16-bit state, in place)"))
