"""The hypernetworks' building blocks: the element-wise MLP (fast-net, MetaQuant's FC heads) and
FSG's Mamba slow-net.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from fsg.estimators.base import check_choice, check_int
from fsg.ssm.mamba import Mamba


__all__ = ["ElementwiseMLP", "SlowNet"]


class ElementwiseMLP(nn.Module):
    """Bias-free MLP ``1 → h → … → h → 1`` applied to every element of a tensor independently.

    ``depth`` linear layers; ``nonlinearity`` (``None``, ``"relu"`` or ``"tanh"``) between them.
    With ``None`` (FSG's default) the map is linear, ``x ↦ a·x`` with a learned factorised ``a``.
    """

    def __init__(self, hidden: int = 100, depth: int = 3, nonlinearity: Optional[str] = None):
        super().__init__()
        check_int("hidden", hidden)
        check_int("depth", depth, 2)
        check_choice("nonlinearity", nonlinearity, (None, "relu", "tanh"))
        dims = [1] + [hidden] * (depth - 1) + [1]
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=False) for a, b in zip(dims[:-1], dims[1:]))
        self.nonlinearity = nonlinearity

    def forward(self, x: Tensor) -> Tensor:
        if self.nonlinearity is None:
            # a chain of linear maps 1→h→…→1 is one scalar a = W_k⋯W_1: x ↦ a·x. Computing a
            # first costs O(h²) instead of O(numel·h²), with the same value and gradients.
            a = self.layers[0].weight
            for lin in self.layers[1:]:
                a = lin.weight @ a
            return x * a.reshape(())
        y = x.reshape(-1, 1)
        for i, lin in enumerate(self.layers):
            y = lin(y)
            if i < len(self.layers) - 1 and self.nonlinearity is not None:
                y = torch.relu(y) if self.nonlinearity == "relu" else torch.tanh(y)
        return y.view_as(x)


def run_lstm(lstm: nn.LSTM, x: Tensor, state=None):
    """``lstm(x, state)``, on the CPU without oneDNN (whose LSTM rebuilds its kernels for every new
    input shape — the binarized layers differ in size — and is then slower) and without touching
    the process-global ``torch.backends.mkldnn.enabled`` (another thread may be running).

    On the CPU a one-layer, unidirectional LSTM without projection runs here as ATen's own
    non-oneDNN LSTM does, op for op (one ``linear`` for the input projection of all steps, then
    per step ``linear_hh(h) + x_t``, the gates ``i, f, g, o``, ``c' = f·c + i·g``, ``h' = o·tanh c'``),
    so that outputs and gradients are bit-identical to ``lstm(x, state)`` with oneDNN disabled.
    Other LSTMs and devices call ``lstm(x, state)``. Returns ``(output, (h, c))``."""
    if (x.device.type != "cpu" or x.dim() != 3 or lstm.num_layers != 1 or lstm.bidirectional
            or lstm.proj_size != 0):
        return lstm(x, state)
    F = torch.nn.functional
    seq = x.transpose(0, 1) if lstm.batch_first else x  # (T, B, input)
    if state is None:
        zeros = torch.zeros(1, seq.shape[1], lstm.hidden_size, dtype=x.dtype, device=x.device)
        state = (zeros, zeros)
    h, c = state[0][0], state[1][0]
    w_ih, w_hh = lstm.weight_ih_l0, lstm.weight_hh_l0
    b_ih, b_hh = (lstm.bias_ih_l0, lstm.bias_hh_l0) if lstm.bias else (None, None)
    outputs = []
    for x_w in F.linear(seq, w_ih, b_ih).unbind(0):
        gates = F.linear(h, w_hh, b_hh).add_(x_w)
        i, f, g, o = gates.unsafe_chunk(4, 1)
        i, f, g, o = i.sigmoid_(), f.sigmoid_(), g.tanh_(), o.sigmoid_()
        c = (f * c).add_(i * g)
        h = o * c.tanh()
        outputs.append(h)
    out = torch.stack(outputs, 0) if outputs else seq.new_empty(0, seq.shape[1], lstm.hidden_size)
    return (out.transpose(0, 1) if lstm.batch_first else out), (h.unsqueeze(0), c.unsqueeze(0))


class SlowNet(nn.Module):
    """FSG's slow-net over the gradient history: one Mamba block, ``(B, T, 1) → (B, T, 1)``.

    (FSG's other slow-net, ``slow_net="lstm-fc"``, reads ``W̃`` instead: it is :class:`LSTMFC`.)
    """

    kind = "mamba"

    def __init__(self, d_state: int = 16, d_conv: int = 8, expand: int = 100):
        super().__init__()
        self.mamba = Mamba(d_model=1, d_state=d_state, d_conv=d_conv, expand=expand)

    def forward(self, seq: Tensor, low_memory: bool = False, resets: Optional[Tensor] = None) -> Tensor:
        """``low_memory``: keep (almost) no activations for the backward pass, recompute them
        there; ``resets``: several sequences packed in a row (see
        :meth:`fsg.ssm.mamba.Mamba.forward`)."""
        return self.mamba(seq, low_memory=low_memory, resets=resets)

    def stream(self, seq: Tensor, state=None, state_buffer: Optional[Tensor] = None, low_memory: bool = False):
        """Continue the recurrence by ``seq`` (B, T_new, 1) from ``state`` (None: start).
        Returns ``(out, new_state)``; the state enters as a constant (no gradient).
        ``state_buffer``: a free tensor the Mamba scan state may be written into. ``low_memory``:
        keep no activations for the backward pass (see :meth:`fsg.ssm.mamba.Mamba.stream`)."""
        return self.mamba.stream(seq, state, state_buffer=state_buffer, low_memory=low_memory)
