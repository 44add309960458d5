"""State-space (Mamba) operations behind swappable backends.

What lives here: the selective scan, the causal depthwise convolution, the low-memory Mamba block
(forward without stored activations) and the streaming scan step, each dispatched to the backend
selected for the tensors' device; and the Mamba block built on them (:mod:`fsg.ssm.mamba`,
:class:`~fsg.ssm.mamba.Mamba`), which this package's ``__init__`` and backends do not import.

Modules:

* :mod:`fsg.ssm.reference`: the plain-PyTorch definitions (:func:`selective_scan_ref`,
  :func:`causal_conv1d_ref`, :func:`check_scan_shapes`), the fallback of every backend.
* :mod:`fsg.ssm.cpu`: the compiled C kernels for the CPU (formerly ``fsg.scan_cpu``).
* :mod:`fsg.ssm.backends`: :class:`Backend`, the registry, the selection and the dispatchers.
* :mod:`fsg.ssm.packing`: several sequences in one row, for one scan with ``resets``.
* :mod:`fsg.ssm.lowmem`: the low-memory Mamba block on a backend's scan kernels (``cpu``, ``triton``).
* ``fsg.ssm.triton_scan``: Triton kernels for CUDA (optional; the ``"triton"`` backend).
* :mod:`fsg.ssm.mamba`: the Mamba block (``d_model``-wide, ``mamba_ssm.Mamba``'s parameter names) and
  the old ``set_scan_impl`` names (deprecated).

Public API::

    Backend(name, devices=None, selective_scan=None, causal_conv1d=None, mamba_low_memory=None,
            selective_scan_step=None, priority=None, check_available=None, description="",
            mamba_stream=None)
    register_backend(backend) -> backend;  unregister_backend(name);  get_backend(name) -> Backend
    list_backends() -> [name, ...];  set_backend(name);  use_backend(name)  (context manager)
    current_backend() -> "auto" | name;  select_backend(device) -> Backend (what "auto" picks)
    selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, initial_state=None, resets=None)
    supports_resets(device) -> bool  # the selected backend's kernels restart the state at resets
    pack_sequences(seqs, gap) -> (row, resets, starts);  packed_starts(lengths, gap)
                         # sequences packed in one row for one scan (fsg.ssm.packing)
    selective_scan_step(..., same arguments, last_out=None, state_dtype=None)
                         # streaming: state into last_out, stored as state_dtype (16 bits: rounded)
    mamba_stream(block, window, h, state_dtype, in_place=False, state_buffer=None)
                         # Mamba.stream's low-memory step (None: the backend has none)
    causal_conv1d(x, weight, bias=None, silu=False)
    mamba_low_memory(block, x, resets=None)
    selective_scan_ref(...), causal_conv1d_ref(x, weight, bias=None, silu=False),
    check_scan_shapes(u, delta, A, B, C, D=None, z=None, delta_bias=None, initial_state=None),
    check_conv_shapes(x, weight, bias=None), compute_dtype(dtype)

Built-in backends: ``"reference"`` (any device), ``"cpu"`` (C kernels), ``"mamba_ssm"`` (CUDA),
``"triton"`` (CUDA). ``"auto"`` (the default) picks per device by priority: on CUDA ``mamba_ssm``,
then ``triton``, else the reference with a one-time warning; on the CPU the C kernels when they
build, else the reference. See :mod:`fsg.ssm.backends` for the details and fallbacks.
"""

from fsg.ssm import backends
from fsg.ssm import cpu
from fsg.ssm import reference
from fsg.ssm.backends import (
    AUTO,
    Backend,
    causal_conv1d,
    current_backend,
    get_backend,
    list_backends,
    mamba_low_memory,
    mamba_stream,
    register_backend,
    select_backend,
    selective_scan,
    selective_scan_step,
    set_backend,
    supports_resets,
    unregister_backend,
    use_backend,
)
from fsg.ssm.packing import pack_sequences, packed_starts
from fsg.ssm.reference import causal_conv1d as causal_conv1d_ref
from fsg.ssm.reference import check_conv_shapes, check_scan_shapes, compute_dtype, selective_scan_ref

__all__ = [
    "AUTO", "Backend", "register_backend", "unregister_backend", "get_backend", "list_backends",
    "set_backend", "use_backend", "current_backend", "select_backend",
    "selective_scan", "selective_scan_step", "causal_conv1d", "mamba_low_memory", "mamba_stream",
    "supports_resets", "pack_sequences", "packed_starts",
    "selective_scan_ref", "causal_conv1d_ref", "check_scan_shapes", "check_conv_shapes", "compute_dtype",
    "backends", "cpu", "reference",
]
