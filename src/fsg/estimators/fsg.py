"""FSG, Fast and Slow Gradient generation (AAAI 2025): ``G = β·G_slow + (1−β)·c⊙G_fast``, the
fast-net an element-wise MLP on ``W̃``, the slow-net a Mamba block over a history of past
gradients with a learned per-layer embedding (METHOD.md §5).
"""


from __future__ import annotations

from collections import deque
from typing import Callable, Deque, List, Optional, Tuple

import torch
from torch import Tensor, nn

from fsg.estimators.base import (STATE_DTYPES, Estimator, LayerContext, check_choice, check_int, check_lr,
                                  register_estimator)
from fsg.estimators.metaquant import LSTMFC
from fsg.estimators.nets import ElementwiseMLP, SlowNet

__all__ = ["FSG"]


@register_estimator("fsg")
class FSG(Estimator):
    """Fast and Slow Gradient generation (AAAI 2025).

    * fast-net ``F`` (element-wise MLP ``1→h→h→1`` on ``W̃``): ``G_fast = g ⊙ F(W̃)``.
    * HGS: per layer a FIFO of the last ``history`` gradients ``g``, pushed every step.
    * LRE: a learned embedding per binarized layer, prepended as the first slow-net token.
    * slow-net ``S``, ``slow_net="mamba"`` (the paper): one Mamba block (d_model = 1) reading the
      history:
      ``layout="flat"``: one sequence per layer ``[e_l, vec g⁽ᵗ⁻ᴸ⁾, …, vec g⁽ᵗ⁻¹⁾]``, ``G_slow``
      = outputs at the last ``n_l`` positions; ``layout="temporal"``: one sequence per element
      ``[e_l, g_i⁽ᵗ⁻ᴸ⁾, …, g_i⁽ᵗ⁻¹⁾]``, ``G_slow`` = output at the last position;
      ``layout="stream"``: the temporal layout as an unbounded recurrence — each element's
      sequence ``[e_l, g_i⁽⁰⁾, g_i⁽¹⁾, …]`` is never re-scanned: the slow-net keeps its state
      per element (Mamba: the scan state, ``d_inner × d_state`` floats, and the last
      ``d_conv − 1`` inputs) and consumes one new gradient per step;
      ``G_slow`` = its output for ``g_i⁽ᵗ⁻¹⁾``. ``history`` is then unused (the memory is
      the state). Gradient truncation: the state carried from earlier steps is a constant, so
      the hypernetwork's gradient at step ``t`` flows only through the processing of the token
      ``g⁽ᵗ⁻¹⁾`` (truncated back-propagation through time with window 1); the LRE token, first
      in every element's sequence, is trained only in the first meta step.
    * ``slow_net="lstm-fc"`` (the paper's LSTM ablation, the reference code's
      ``MetaFastAndLSTM``): the slow-net is MetaQuant's LSTMFC (:class:`LSTMFC`) on ``W̃``,
      ``G_slow = g ⊙ FC(LSTM(W̃))``: a one-layer LSTM (hidden ``lstm_hidden``, default the
      fast-net's ``fast_hidden``, 100) run element-wise (batch = elements, sequence length 1),
      its ``(h, c)`` per layer carried (detached) from step to step, and a linear head with
      bias. No HGS and no LRE: ``history``, ``lre`` and ``layout`` must be left unset (one-line
      error otherwise); the Mamba options (``d_state``, ``d_conv``, ``expand``, ``recompute``)
      are ignored. Its parameters (LSTM and head) are the ``slow`` Adam group (``slow_lr``), as
      in the reference (one Adam over the slow-net, lr 1e-3).
    * ``D = β·G_slow + (1−β)·c⊙G_fast``; ``U = D`` (``update="combined"``, the paper) or
      ``U = c⊙G_fast`` (``update="fast"``, the reference code). With either slow-net ``G_slow``
      is not multiplied by the calibration ``c`` (the reference: ``0.9·slow + 0.1·c⊙fast``).
    * ``recompute=True``: each layer's slow-net forward is recomputed during the backward pass
      (activation checkpointing), so only its input sequence is kept meanwhile; this bounds
      the memory of a step by one layer's activations instead of all layers'.
    * ``state_dtype`` (``layout="stream"`` with the Mamba slow-net only): the dtype the carried
      scan state is stored in, ``"float32"`` (default), ``"bfloat16"`` or ``"float16"`` (half
      the memory: 0.87 GB instead of 1.7 GB for ResNet-20). The arithmetic stays float32: each
      step reads the stored state, computes in float32 (``G_slow`` from the unrounded new
      state) and stores the new state rounded to nearest even. A 16-bit state is also updated
      in place (the backward pass of the step writes the new state over the old one, so one
      copy exists instead of two) and, with ``recompute``, the step keeps nothing of the
      slow-net's activations for the backward pass (see :meth:`fsg.mamba.Mamba.stream`); the
      float32 state keeps the previous behaviour exactly (two alternating state buffers).
    """

    def __init__(
        self,
        beta: float = 0.9,
        history: Optional[int] = None,
        update: str = "combined",
        lre: Optional[bool] = None,
        slow_net: str = "mamba",
        layout: Optional[str] = None,
        fast_hidden: int = 100,
        fast_nonlinearity: Optional[str] = None,
        d_state: int = 16,
        d_conv: int = 8,
        expand: int = 100,
        lstm_hidden: Optional[int] = None,
        recompute: bool = True,
        fast_lr: float = 1e-2,
        slow_lr: float = 1e-3,
        lre_lr: float = 1e-3,
        state_dtype: str = "float32",
    ):
        super().__init__()
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be a number in [0, 1], got {beta!r}")
        self.beta = float(beta)
        if slow_net == "lstm":
            raise ValueError("slow_net='lstm' (an LSTM scanning the flat gradient history) was removed; the "
                             "paper's LSTM ablation is slow_net='lstm-fc' (MetaQuant's LSTMFC on W̃)")
        check_choice("slow_net", slow_net, ("mamba", "lstm-fc"))
        self.slow_net = slow_net
        check_choice("update", update, ("combined", "fast"))
        self.update = update
        self.recompute = bool(recompute)
        self.fast = ElementwiseMLP(fast_hidden, depth=3, nonlinearity=fast_nonlinearity)
        if slow_net == "lstm-fc":
            given = [k for k, v in (("history", history), ("lre", lre), ("layout", layout)) if v is not None]
            if given:
                raise ValueError(f"slow_net='lstm-fc' reads W̃, not the gradient history, and has no layer "
                                 f"embedding: leave {', '.join(given)} unset")
            # no HGS (a FIFO of length 0 keeps nothing), no LRE
            self.history_len, self.layout, self.use_lre = 0, None, False
            # MetaQuant's LSTMFC module, G_slow = its refined(ctx); its own meta_lr is unused here
            self.slow = LSTMFC(hidden=check_int("lstm_hidden", fast_hidden if lstm_hidden is None else lstm_hidden))
        else:
            self.history_len = check_int("history (L)", 5 if history is None else history)
            self.layout = "flat" if layout is None else layout
            check_choice("layout", self.layout, ("flat", "temporal", "stream"))
            self.use_lre = True if lre is None else bool(lre)
            self.slow = SlowNet(d_state=d_state, d_conv=d_conv, expand=expand)
        check_choice("state_dtype", state_dtype, tuple(STATE_DTYPES))
        if state_dtype != "float32" and (self.slow_net != "mamba" or self.layout != "stream"):
            raise ValueError(f"state_dtype={state_dtype!r} stores the carried Mamba state of layout='stream': "
                             f"it needs slow_net='mamba' and layout='stream'")
        self.state_dtype = state_dtype
        self.fast_lr = check_lr("fast_lr", fast_lr)
        self.slow_lr = check_lr("slow_lr", slow_lr)
        self.lre_lr = check_lr("lre_lr", lre_lr)
        self.lre: Optional[nn.Embedding] = None
        self.hgs: List[Deque[Tensor]] = []

    def setup(self, layer_names, layer_shapes) -> None:
        super().setup(layer_names, layer_shapes)
        n = len(self.layer_names)
        if self.use_lre and (self.lre is None or self.lre.num_embeddings != n):
            p = next(self.fast.parameters())
            self.lre = nn.Embedding(n, 1).to(device=p.device, dtype=p.dtype)
        self.hgs = [deque(maxlen=self.history_len) for _ in range(n)]
        if self.slow_net == "lstm-fc":
            self.slow.setup(layer_names, layer_shapes)  # one carried (h, c) per layer
        self.stream_states: List[Optional[tuple]] = [None] * n
        # per layer, the scan-state tensor of two steps ago: free once the previous step's
        # backward is done, so the next state is written into it (no 1.7 GB allocation per step)
        self._stream_spare: List[Optional[Tensor]] = [None] * n
        # 16-bit state, updated in place: per layer, the pending update's finish() (see observe)
        self._stream_finish: List[Optional[Callable[[], None]]] = [None] * n

    def observe(self, index: int, grad: Tensor, w_tilde: Tensor) -> None:
        self.hgs[index].append(grad.detach())
        self._finish_stream(index)  # after the backward pass: the in-place state update is complete

    def _finish_stream(self, index: Optional[int] = None) -> None:
        """Complete the pending in-place state updates (one layer, or all): normally the step's
        backward pass has written the new state already and this only drops the handle."""
        pending = getattr(self, "_stream_finish", None) or []
        for i in range(len(pending)) if index is None else [index]:
            if pending[i] is not None:
                pending[i]()
                pending[i] = None

    def slow_gradient(self, index: int) -> Tensor:
        """``G_slow`` of layer ``index`` from its history (the last entry is ``g⁽ᵗ⁻¹⁾``)."""
        hist = list(self.hgs[index])
        if not hist:
            raise RuntimeError(f"FSG history of layer {index} is empty: observe() a gradient first")
        shape = hist[-1].shape
        n = hist[-1].numel()
        if self.layout == "stream":
            seq = hist[-1].reshape(n, 1, 1)
            self._finish_stream(index)  # (normally done by observe)
            state = self.stream_states[index]
            if state is None and self.lre is not None:  # the stream starts with the layer's token
                seq = torch.cat([self.lre.weight[index].view(1, 1, 1).expand(n, 1, 1).to(seq.dtype), seq], dim=1)
            if self.state_dtype == "float32":
                out, new_state = self.slow.stream(seq, state, state_buffer=self._stream_spare[index])
                self._stream_spare[index] = state[-1] if (state is not None and self.slow.kind == "mamba") else None
            else:  # 16 bits, one copy: the step's backward pass writes the new state over the old
                out, new_state, self._stream_finish[index] = self.slow.mamba.stream(
                    seq, state, state_dtype=STATE_DTYPES[self.state_dtype], low_memory=self.recompute, in_place=True)
            self.stream_states[index] = new_state
            return out[:, -1, 0].reshape(shape)
        if self.layout == "flat":
            seq = torch.cat([h.reshape(-1) for h in hist]).view(1, -1, 1)
            first = self.lre.weight[index].view(1, 1, 1) if self.lre is not None else None
        else:
            seq = torch.stack([h.reshape(-1) for h in hist], dim=1).unsqueeze(-1)  # (n, k, 1)
            first = self.lre.weight[index].view(1, 1, 1).expand(n, 1, 1) if self.lre is not None else None
        if first is not None:
            seq = torch.cat([first.to(seq.dtype), seq], dim=1)
        # recompute: keep only this layer's input sequence (and the scan's chunk states) for the
        # backward pass, not the slow-net's activations — tens of (T, d_inner) tensors per layer
        # would otherwise stay alive until the task loss is back-propagated
        out = self.slow(seq, low_memory=self.recompute)
        g_slow = out[0, -n:, 0] if self.layout == "flat" else out[:, -1, 0]
        return g_slow.reshape(shape)

    def directions(self, ctx: LayerContext) -> Tuple[Tensor, Tensor]:
        g_fast = ctx.grad * self.fast(ctx.w_tilde)
        cg_fast = ctx.calibration * g_fast
        if self.beta > 0:
            # G_slow enters without the calibration c, for either slow-net (as in the reference)
            g_slow = self.slow.refined(ctx) if self.slow_net == "lstm-fc" else self.slow_gradient(ctx.index)
            d = self.beta * g_slow + (1 - self.beta) * cg_fast
        else:
            d = cg_fast
        u = d.detach() if self.update == "combined" else cg_fast.detach()
        return d, u

    def meta_param_groups(self) -> List[dict]:
        groups = [
            {"name": "fast", "params": list(self.fast.parameters()), "lr": self.fast_lr},
            {"name": "slow", "params": list(self.slow.parameters()), "lr": self.slow_lr},
        ]
        if self.lre is not None:
            groups.append({"name": "lre", "params": list(self.lre.parameters()), "lr": self.lre_lr})
        return groups

    def get_extra_state(self):
        self._finish_stream()
        return {"hgs": [list(h) for h in self.hgs],
                "stream": [list(s) if s is not None else None for s in self.stream_states]}

    def set_extra_state(self, state) -> None:
        self.hgs = [deque(h, maxlen=self.history_len) for h in state["hgs"]]
        streams = state.get("stream") or [None] * len(self.hgs)
        self.stream_states = [tuple(s) if s is not None else None for s in streams]
        self._stream_spare = [None] * len(self.stream_states)
        self._stream_finish = [None] * len(self.stream_states)
