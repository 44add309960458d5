"""FSG, Fast and Slow Gradient generation (AAAI 2025): ``G = β·G_slow + (1−β)·c⊙G_fast``, the
fast-net an element-wise MLP on ``W̃``, the slow-net a Mamba block over a history of past
gradients with a learned per-layer embedding (METHOD.md §5).
"""


from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Deque, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from fsg.estimators.base import STATE_DTYPES, Estimator, LayerContext, register_estimator
from fsg.estimators.config import EstimatorConfig, option
from fsg.estimators.metaquant import LSTMFC
from fsg.estimators.nets import ElementwiseMLP, SlowNet
from fsg.ssm import packed_starts, supports_resets

__all__ = ["FSG", "FSGConfig", "PackPlan", "joint_rows", "pack_plan"]

_LR = dict(kind="float", low=0, low_open=True)
_SIZE = dict(kind="int", low=1)


def joint_rows(parts: List[Tensor], copy: bool = True) -> Optional[Tensor]:
    """``torch.cat(parts)`` along the first dimension, as a view without a copy when the parts
    are consecutive row blocks of one tensor (e.g. ``t.split(sizes)``, also after a checkpoint
    round trip: ``torch.save`` keeps views of one storage together): same storage, dtype and
    strides, each part starting where the previous one ends. Otherwise a new tensor, or None if
    not ``copy``."""
    first = parts[0]
    storage = first.untyped_storage().data_ptr()
    offset = first.storage_offset()
    for t in parts:
        if (t.dtype != first.dtype or t.device != first.device or t.shape[1:] != first.shape[1:]
                or t.stride() != first.stride() or t.untyped_storage().data_ptr() != storage
                or t.storage_offset() != offset):
            return torch.cat(parts) if copy else None
        offset += t.shape[0] * t.stride(0)
    rows = sum(t.shape[0] for t in parts)
    return first.as_strided((rows,) + tuple(first.shape[1:]), first.stride(), first.storage_offset())


@dataclass(frozen=True)
class PackPlan:
    """How :meth:`FSG.packed_slow_gradients` lays out the flat layout's sequences (one per layer,
    ``[e_l, vec g⁽ᵗ⁻ᵏ⁾, …, vec g⁽ᵗ⁻¹⁾]``) for a few slow-net calls: ``calls`` the positions (in
    the layers' order) of the layers packed in each call; ``lengths`` each call's row length;
    ``resets`` each call's (1, length) tokens where the scan restarts; in the calls' rows
    concatenated, ``lre_at`` the positions of the layers' first tokens, ``pieces`` the consecutive
    pieces that make up the rows, ``(kind, layer position, size or entry)``: ``("gap", m, size)``
    and ``("first", m, 1)`` zeros, ``("history", m, k)`` entry ``k`` of layer ``m``'s history; and
    ``gather`` the positions of the layers' ``G_slow`` (each sequence's last ``n_l`` outputs) in
    the layers' order."""

    calls: Tuple[Tuple[int, ...], ...]
    lengths: Tuple[int, ...]
    resets: Tuple[Tensor, ...]
    lre_at: Tensor
    pieces: Tuple[Tuple[str, int, int], ...]
    gather: Tensor


def pack_plan(history: List[List[int]], first: int, gap: int, device) -> PackPlan:
    """The :class:`PackPlan` of layers whose gradient histories have the entries of sizes
    ``history[l]`` (oldest first; the last entry's size is the layer's ``n_l``), with ``first``
    (0 or 1) leading token per sequence and ``gap`` zero tokens between packed sequences
    (``d_conv − 1``, :mod:`fsg.ssm.packing`). Calls are filled first-fit by decreasing length,
    none longer than the longest sequence (so no call needs more memory than that sequence's own
    call); each call's layers in their order."""
    lengths = [first + sum(h) for h in history]
    cap = max(lengths)
    calls: List[List[int]] = []
    for l in sorted(range(len(history)), key=lambda l: -lengths[l]):
        for members in calls:
            if sum(lengths[m] + gap for m in members) + lengths[l] <= cap:
                members.append(l)
                break
        else:
            calls.append([l])
    calls = [sorted(c) for c in calls]
    calls.sort()
    pieces, lre_at, gather = [], [None] * len(history), [None] * len(history)
    resets, call_lengths, base = [], [], 0
    for members in calls:
        starts, total = packed_starts([lengths[m] for m in members], gap)
        for j, (m, start) in enumerate(zip(members, starts)):
            if j:
                pieces.append(("gap", m, gap))
            if first:
                pieces.append(("first", m, 1))
            pieces += [("history", m, k) for k in range(len(history[m]))]
            lre_at[m] = base + start
            end = base + start + lengths[m]
            gather[m] = torch.arange(end - history[m][-1], end)
        r = torch.zeros(1, total, dtype=torch.bool)
        r[0, starts] = True
        resets.append(r.to(device))
        call_lengths.append(total)
        base += total
    return PackPlan(tuple(tuple(c) for c in calls), tuple(call_lengths), tuple(resets),
                    torch.tensor(lre_at, device=device), tuple(pieces), torch.cat(gather).to(device))


@dataclass(frozen=True)
class FSGConfig(EstimatorConfig):
    """Options of FSG; ``None`` (history, lre, layout, lstm_hidden) means "unset": the value that
    follows from the slow-net (:meth:`resolved`). Cross-field rules (:meth:`check`): the
    ``lstm-fc`` slow-net takes no ``history``/``lre``/``layout``; ``state_dtype`` other than
    float32 needs ``slow_net="mamba"`` and ``layout="stream"``."""

    beta: float = option(0.9, "weight β of the slow gradient, D = β·G_slow + (1−β)·c⊙G_fast",
                         kind="float", low=0, high=1)
    history: Optional[int] = option(None, "length L of the gradient history HGS, mamba slow-net (1 = no history)",
                                    default_text="5 (mamba slow-net)", **_SIZE)
    update: str = option("combined", "weight update U: combined = D (the paper), fast = c⊙G_fast (the reference code)",
                         kind="choice", choices=("combined", "fast"))
    lre: Optional[bool] = option(None, "learned layer embedding, the first slow-net token (mamba slow-net)",
                                 kind="bool", default_text="on (mamba slow-net)")
    slow_net: str = option("mamba", "slow-net: mamba = a Mamba block reading the gradient history (the paper); "
                           "lstm-fc = MetaQuant's LSTMFC on W̃, no history, no layer embedding (the paper's LSTM "
                           "ablation; history, lre and layout must stay unset)",
                           kind="choice", choices=("mamba", "lstm-fc"))
    layout: Optional[str] = option(None, "mamba slow-net input: flat = one sequence per layer (the paper), temporal = "
                                   "one per weight, stream = the temporal layout as a recurrence with per-weight state",
                                   kind="choice", choices=("flat", "temporal", "stream"), optional=True,
                                   default_text="flat (mamba slow-net)")
    fast_hidden: int = option(100, "fast-net hidden width h (1→h→h→1)", **_SIZE)
    fast_nonlinearity: Optional[str] = option(None, "fast-net nonlinearity (None: linear)",
                                              kind="choice", choices=(None, "relu", "tanh"))
    d_state: int = option(16, "Mamba state size", **_SIZE)
    d_conv: int = option(8, "Mamba causal convolution width", **_SIZE)
    expand: int = option(100, "Mamba channels d_inner = expand (d_model = 1)", **_SIZE)
    lstm_hidden: Optional[int] = option(None, "hidden size of the lstm-fc slow-net's LSTM",
                                        default_text="fast_hidden", **_SIZE)
    recompute: bool = option(True, "recompute each layer's slow-net activations in the backward pass instead of "
                             "keeping them (bounded memory)", kind="bool")
    fast_lr: float = option(1e-2, "Adam learning rate of the fast-net", **_LR)
    slow_lr: float = option(1e-3, "Adam learning rate of the slow-net", **_LR)
    lre_lr: float = option(1e-3, "Adam learning rate of the layer embedding", **_LR)
    batch_layers: Optional[bool] = option(
        None, "mamba slow-net: run the fast-net once on all layers and the slow-net on several layers at once "
        "(flat: the layers' sequences packed in rows where the scan backend restarts the state at resets, e.g. "
        "Triton, else layers of equal size; temporal: any layers; no call longer than the largest layer's; stream: "
        "all layers in one call, their states one tensor), instead of once per layer; the same directions up to "
        "float rounding, far fewer kernel launches on a GPU",
        kind="bool", default_text="on when the slow-net is on CUDA")
    state_dtype: str = option("float32", "layout stream: dtype of the carried per-weight Mamba state; 16 bits halve "
                              "it and keep one copy (float32 arithmetic, rounded to nearest even when stored)",
                              kind="choice", choices=tuple(STATE_DTYPES))

    def validate(self) -> "FSGConfig":
        if self.slow_net == "lstm":
            raise ValueError("slow_net='lstm' (an LSTM scanning the flat gradient history) was removed; the "
                             "paper's LSTM ablation is slow_net='lstm-fc' (MetaQuant's LSTMFC on W̃)")
        return super().validate()

    def check(self) -> None:
        if self.slow_net == "lstm-fc":
            given = [k for k in ("history", "lre", "layout") if getattr(self, k) is not None]
            if given:
                raise ValueError(f"slow_net='lstm-fc' reads W̃, not the gradient history, and has no layer "
                                 f"embedding: leave {', '.join(given)} unset")
        if self.state_dtype != "float32" and (self.slow_net != "mamba" or self.resolved()["layout"] != "stream"):
            raise ValueError(f"state_dtype={self.state_dtype!r} stores the carried Mamba state of layout='stream': "
                             f"it needs slow_net='mamba' and layout='stream'")

    def resolved(self) -> Dict[str, object]:
        """The unset options' values: ``history`` (L; 0 with lstm-fc: no HGS), ``lre``, ``layout``
        (``None`` with lstm-fc) and ``lstm_hidden``."""
        if self.slow_net == "lstm-fc":
            return {"history": 0, "lre": False, "layout": None,
                    "lstm_hidden": self.fast_hidden if self.lstm_hidden is None else self.lstm_hidden}
        return {"history": 5 if self.history is None else self.history, "lre": True if self.lre is None else self.lre,
                "layout": "flat" if self.layout is None else self.layout, "lstm_hidden": self.lstm_hidden}


@register_estimator("fsg", config=FSGConfig)
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
      copy exists instead of two), and so is a float32 state on CUDA; a float32 state on the CPU
      keeps two alternating buffers (the new state is written into the spare one; see
      :meth:`stream_in_place`). Either way, with ``recompute`` the step keeps
      nothing of the slow-net's activations for the backward pass (see
      :meth:`fsg.ssm.mamba.Mamba.stream`; on the CPU one kernel each way does the whole step).
    * carried state (the stream layout's per-weight Mamba state ``s⁽ᵗ⁾``; the lstm-fc slow-net's
      ``(h, c)``): :meth:`directions` computes ``(G_slow, s⁽ᵗ⁾)`` from ``s⁽ᵗ⁻¹⁾`` and leaves ``s⁽ᵗ⁾``
      pending (:attr:`pending_stream`); :meth:`commit`, called by the trainer after the step's
      backward pass, makes it the carried state. A 16-bit in-place state is the exception the
      memory saving needs: the backward pass through ``G_slow`` overwrites it with ``s⁽ᵗ⁾``.
    * ``batch_layers`` (the mamba slow-net): the trainer asks for all layers' directions at once
      (:meth:`directions_all`); the element-wise fast-net then runs once on all layers' ``W̃``
      and the slow-net on several layers at once. Flat: the layers' sequences packed in rows,
      the scan restarting at each (:meth:`packed_slow_gradients`, where the scan backend has
      resets in its kernels: Triton, the reference), else layers of equal size as rows of one
      call; temporal: layers as rows (:meth:`slow_gradients`); never more tokens per call than
      the largest layer's, so no more memory. Stream: all layers in one call
      (:meth:`stream_gradients`), the layers' carried states rows of one tensor. On a GPU,
      where a step of this size is mostly kernel launches, this divides their launches by the
      number of layers batched together.
      Unset: on when the slow-net is on CUDA (on the CPU, per layer keeps earlier runs' numbers
      bit for bit).
    * options: :class:`FSGConfig` (``FSG(**options)`` = ``FSG(FSGConfig(**options))``).
    """

    def __init__(self, config: Optional[FSGConfig] = None, **options):
        super().__init__()
        cfg = self.config = FSGConfig.from_options(config, **options)
        unset = cfg.resolved()
        self.beta = float(cfg.beta)
        self.slow_net, self.update, self.recompute = cfg.slow_net, cfg.update, bool(cfg.recompute)
        self.fast = ElementwiseMLP(cfg.fast_hidden, depth=3, nonlinearity=cfg.fast_nonlinearity)
        self.history_len, self.layout, self.use_lre = unset["history"], unset["layout"], unset["lre"]
        if cfg.slow_net == "lstm-fc":
            # MetaQuant's LSTMFC module, G_slow = its refined(ctx); its own meta_lr is unused here
            self.slow = LSTMFC(hidden=unset["lstm_hidden"])
        else:
            self.slow = SlowNet(d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.expand)
        self.state_dtype = cfg.state_dtype
        self.fast_lr, self.slow_lr, self.lre_lr = float(cfg.fast_lr), float(cfg.slow_lr), float(cfg.lre_lr)
        self.lre: Optional[nn.Embedding] = None
        self.hgs: List[Deque[Tensor]] = []
        self.stream_states: List[Optional[tuple]] = []
        self._stream_spare: List[Optional[Tensor]] = []
        self.pending_stream: Dict[int, tuple] = {}
        self._pack_plans: Dict[tuple, PackPlan] = {}

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
        #: per layer index, what this step's slow_gradient computed and commit() will carry:
        #: ``(new state, the next spare buffer, finish)`` — ``finish`` completes a 16-bit in-place update
        self.pending_stream: Dict[int, tuple] = {}

    def observe(self, index: int, grad: Tensor, w_tilde: Tensor) -> None:
        self.hgs[index].append(grad.detach())

    def commit(self) -> None:
        """Carry this step's new states: LSTMFC's ``(h, c)`` (slow_net ``lstm-fc``) and, with the
        stream layout, each layer's Mamba state ``s⁽ᵗ⁾`` (after the backward pass: a 16-bit state's
        in-place update is completed here)."""
        if self.slow_net == "lstm-fc":
            self.slow.commit()
        for i, (state, spare, finish) in self.pending_stream.items():
            if finish is not None:
                finish()
            self.stream_states[i], self._stream_spare[i] = state, spare
        self.pending_stream.clear()

    def _history(self, index: int) -> List[Tensor]:
        hist = list(self.hgs[index])
        if not hist:
            raise RuntimeError(f"FSG history of layer {index} is empty: observe() a gradient first")
        return hist

    def history_sequence(self, index: int) -> Tensor:
        """Layouts flat and temporal: the slow-net input of layer ``index``, ``(1, 1 + k·n, 1)``
        (flat: ``[e_l, vec g⁽ᵗ⁻ᵏ⁾, …, vec g⁽ᵗ⁻¹⁾]``) or ``(n, 1 + k, 1)`` (temporal), without the
        leading ``e_l`` when ``lre`` is off."""
        hist = self._history(index)
        n = hist[-1].numel()
        if self.layout == "flat":
            seq = torch.cat([h.reshape(-1) for h in hist]).view(1, -1, 1)
            first = self.lre.weight[index].view(1, 1, 1) if self.lre is not None else None
        else:
            seq = torch.stack([h.reshape(-1) for h in hist], dim=1).unsqueeze(-1)  # (n, k, 1)
            first = self.lre.weight[index].view(1, 1, 1).expand(n, 1, 1) if self.lre is not None else None
        if first is not None:
            seq = torch.cat([first.to(seq.dtype), seq], dim=1)
        return seq

    def _g_slow(self, index: int, out: Tensor) -> Tensor:
        """``G_slow`` of layer ``index`` from the slow-net output on :meth:`history_sequence`: the
        outputs at the last ``n`` positions (flat) or each weight's last output (temporal)."""
        shape = self.hgs[index][-1].shape
        # flattened first (a view): one slice or select, so one operator in the backward, not three
        if self.layout == "flat":  # out (1, T, 1)
            return out.reshape(-1)[-shape.numel():].reshape(shape)
        return out.squeeze(-1)[:, -1].reshape(shape)  # out (n, T, 1)

    def slow_gradient(self, index: int) -> Tensor:
        """``G_slow`` of layer ``index`` from its history (the last entry is ``g⁽ᵗ⁻¹⁾``)."""
        if self.layout == "stream":
            last = self._history(index)[-1]
            return self.stream_gradient(index, last.reshape(-1, 1, 1)).reshape(last.shape)
        # recompute: keep only this layer's input sequence (and the scan's chunk states) for the
        # backward pass, not the slow-net's activations — tens of (T, d_inner) tensors per layer
        # would otherwise stay alive until the task loss is back-propagated
        return self._g_slow(index, self.slow(self.history_sequence(index), low_memory=self.recompute))

    def slow_gradients(self, indices: List[int]) -> Dict[int, Tensor]:
        """Layouts flat and temporal: ``G_slow`` of the layers ``indices``, the slow-net run on
        several layers at once. The layers' :meth:`history_sequence` of equal length are
        concatenated along the batch (flat: the layers of equal size, one row each; temporal: all
        layers, ``n_l`` rows each) in layer order, a batch closed before it would hold more tokens
        than the largest layer's own sequence (so no call needs more memory than the per-layer
        calls), run together and split. Every row is its own sequence, so this is
        :meth:`slow_gradient` of each layer up to float rounding (the slow-net's weight gradients
        are summed over the batch in another order)."""
        seqs = {i: self.history_sequence(i) for i in indices}
        cap = max(s.shape[0] * s.shape[1] for s in seqs.values())
        batches: Dict[int, List[List[int]]] = {}  # sequence length -> batches of layer indices
        for i, s in seqs.items():
            open_ = batches.setdefault(s.shape[1], [[]])
            if sum(seqs[j].shape[0] for j in open_[-1] + [i]) * s.shape[1] > cap:
                open_.append([])
            open_[-1].append(i)
        out: Dict[int, Tensor] = {}
        for members in (b for bs in batches.values() for b in bs):
            y = self.slow(torch.cat([seqs[i] for i in members]), low_memory=self.recompute)
            for i, yi in zip(members, y.split([seqs[i].shape[0] for i in members])):
                out[i] = self._g_slow(i, yi)
        return out

    def packed_slow_gradients(self, indices: List[int]) -> Optional[Tensor]:
        """Layout flat: ``G_slow`` of the layers ``indices``, flattened and concatenated, from a
        few slow-net calls on their sequences packed in rows (:mod:`fsg.ssm.packing`: the scan
        restarts at each sequence's first token, ``d_conv − 1`` zeros between sequences), laid out
        by :func:`pack_plan` (calls no longer than the longest sequence: no more memory than the
        per-layer calls). For ResNet-20 8 calls instead of :meth:`slow_gradients`' 14 (its layers
        of equal size) and 22 per layer. Each sequence's outputs are its own call's up to float
        rounding. None (the caller uses :meth:`slow_gradients`) where the scan backend for the
        slow-net's device has no resets in its kernels (:func:`fsg.ssm.supports_resets`)."""
        device = self.lre.weight.device if self.lre is not None else next(self.slow.parameters()).device
        if self.layout != "flat" or not supports_resets(device):
            return None
        hist = [self._history(i) for i in indices]
        gap, first = self.slow.mamba.d_conv - 1, int(self.lre is not None)
        key = (tuple(tuple(h.numel() for h in hs) for hs in hist), first, gap, str(device))
        plan = self._pack_plans.get(key)
        if plan is None:
            self._pack_plans.clear()  # one plan in use at a time (the history lengths grow at the start)
            plan = self._pack_plans[key] = pack_plan([list(k) for k in key[0]], first, gap, device)
        dtype = hist[0][-1].dtype
        zeros = torch.zeros(max(gap, 1), dtype=dtype, device=device)
        parts = [hist[m][arg].reshape(-1) if kind == "history" else zeros[:arg] for kind, m, arg in plan.pieces]
        rows = torch.cat(parts)  # the first tokens are zeros here, put in below (one differentiable op)
        if first:
            lre = self.lre.weight.view(-1)
            values = lre if indices == list(range(lre.numel())) else lre[torch.tensor(indices, device=device)]
            rows = rows.index_put((plan.lre_at,), values.to(dtype))
        outs = [self.slow(seq.view(1, -1, 1), low_memory=self.recompute, resets=r).view(-1)
                for seq, r in zip(rows.split(plan.lengths), plan.resets)]
        return torch.cat(outs).index_select(0, plan.gather)

    def stream_gradient(self, index: int, seq: Tensor) -> Tensor:
        """Layout ``stream``: ``G_slow`` (n,) from the carried state ``s⁽ᵗ⁻¹⁾`` and the new token
        ``seq = g⁽ᵗ⁻¹⁾`` (n, 1, 1): ``(y, s⁽ᵗ⁾) = S.stream(seq, s⁽ᵗ⁻¹⁾)``, ``G_slow = y`` at the last
        position. ``s⁽ᵗ⁾`` is left pending for :meth:`commit`; the carried state is not changed
        (a 16-bit state is overwritten in place later, by the backward pass through ``y``)."""
        n = seq.shape[0]
        state = self.stream_states[index]
        if state is None and self.lre is not None:  # the stream starts with the layer's token
            seq = torch.cat([self.lre.weight[index].view(1, 1, 1).expand(n, 1, 1).to(seq.dtype), seq], dim=1)
        out, new_state, spare, finish = self._stream_step(seq, state, self._stream_spare[index])
        self.pending_stream[index] = (new_state, spare, finish)
        # one token (every step but the first): a view, whose backward launches nothing
        return out.view(n) if out.shape[1] == 1 else out[:, -1, 0]

    def _stream_step(self, seq: Tensor, state: Optional[tuple], spare: Optional[Tensor]):
        """One call of the slow-net's recurrence: ``(out, new state, the next spare buffer,
        finish)`` (see :meth:`stream_in_place`)."""
        if not self.stream_in_place():
            # the new state goes into the spare buffer (free: two steps old); the old one becomes the next spare
            out, new_state = self.slow.stream(seq, state, state_buffer=spare, low_memory=self.recompute)
            return out, new_state, (state[-1] if (state is not None and self.slow.kind == "mamba") else None), None
        # one copy: the step's backward pass writes the new state over the old
        out, new_state, finish = self.slow.mamba.stream(
            seq, state, state_dtype=STATE_DTYPES[self.state_dtype], low_memory=self.recompute, in_place=True)
        return out, new_state, spare, finish

    def stream_gradients(self, indices: List[int]) -> Optional[Tensor]:
        """Layout ``stream``: ``G_slow`` of the layers ``indices`` (all the estimator's layers, in
        order) flattened and concatenated, from one slow-net call on all their weights at once:
        the layers' carried states are one joint tensor, each layer's state a view of its rows
        (what :meth:`commit` carries), so the call reads and writes them in place, with no copy.
        Each weight is its own sequence, so this is :meth:`stream_gradient` of each layer up to
        float rounding (the slow-net's weight gradients are summed in another order). States that
        are not such views (a checkpoint written per layer, or by an earlier version) are packed
        into one tensor at the first call (a copy, once). None (the caller goes per layer) for
        other ``indices`` or if only some layers have a state."""
        states = [self.stream_states[i] for i in indices]
        if indices != list(range(len(self.stream_states))) or len({s is None for s in states}) != 1:
            return None
        last = [self._history(i)[-1] for i in indices]
        sizes = [g.numel() for g in last]
        seq = torch.cat([g.reshape(-1) for g in last]).view(-1, 1, 1)
        if states[0] is None:  # every stream starts: the layers' tokens first
            state = spare = None
            if self.lre is not None:
                rows = torch.repeat_interleave(torch.arange(len(sizes), device=seq.device),
                                               torch.tensor(sizes, device=seq.device))
                seq = torch.cat([self.lre.weight.view(-1)[rows].view(-1, 1, 1).to(seq.dtype), seq], dim=1)
        else:
            state = tuple(joint_rows([s[j] for s in states]) for j in range(len(states[0])))
            spares = [self._stream_spare[i] for i in indices]
            spare = None if any(t is None for t in spares) else joint_rows(spares, copy=False)
        out, new_state, spare, finish = self._stream_step(seq, state, spare)
        parts = [t.split(sizes) for t in new_state]
        spare_parts = spare.split(sizes) if spare is not None else [None] * len(sizes)
        for k, i in enumerate(indices):  # the same finish for every layer: it is idempotent
            self.pending_stream[i] = (tuple(p[k] for p in parts), spare_parts[k], finish)
        return out.view(-1) if out.shape[1] == 1 else out[:, -1, 0]

    def stream_in_place(self) -> bool:
        """Layout stream: whether each layer's carried state is one tensor updated in place by the
        step's backward pass (a 16-bit ``state_dtype``; float32 when the slow-net is on CUDA, where
        the state's two float32 copies would be most of the GPU memory of a step: 3.4 GB of
        ResNet-20's), rather than two alternating float32 buffers (the CPU's float32, which keeps
        earlier runs' numbers bit for bit)."""
        return self.state_dtype != "float32" or next(self.slow.parameters()).is_cuda

    def directions(self, ctx: LayerContext, g_slow: Optional[Tensor] = None,
                   fast_out: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """``(D, U)`` of one layer; ``g_slow`` / ``fast_out``: its ``G_slow`` / fast-net output ``F(W̃)``
        if already computed (else computed here)."""
        if self.beta > 0 and g_slow is None:
            g_slow = self.slow.refined(ctx) if self.slow_net == "lstm-fc" else self.slow_gradient(ctx.index)
        return self.combine(ctx.grad, ctx.calibration, self.fast(ctx.w_tilde) if fast_out is None else fast_out,
                            g_slow)

    def combine(self, grad: Tensor, calibration: Tensor, fast_out: Tensor,
                g_slow: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """``(D, U)`` from a layer's ``g``, ``c``, fast-net output ``F(W̃)`` and ``G_slow`` (unused if
        β = 0), element-wise (any shape, e.g. several layers flattened and concatenated)::

            G_fast = g ⊙ F(W̃),   D = β·G_slow + (1−β)·c⊙G_fast,   U = D ("combined") or c⊙G_fast

        ``G_slow`` enters without the calibration c, for either slow-net (as in the reference)."""
        cg_fast = calibration * (grad * fast_out)
        d = self.beta * g_slow + (1 - self.beta) * cg_fast if self.beta > 0 else cg_fast
        u = d.detach() if self.update == "combined" else cg_fast.detach()
        return d, u

    def batches_layers(self) -> bool:
        """Whether :meth:`directions_all` runs the fast-net once on all layers and (layouts flat and
        temporal) the slow-net on several layers together (:meth:`slow_gradients`): ``batch_layers``
        (unset: when the slow-net is on CUDA), for the mamba slow-net and β > 0."""
        if self.slow_net != "mamba" or self.beta == 0:
            return False
        if self.config.batch_layers is None:
            return next(self.slow.parameters()).is_cuda
        return bool(self.config.batch_layers)

    def directions_all(self, contexts) -> List[Tuple[Tensor, Tensor]]:
        if not self.batches_layers():
            return super().directions_all(contexts)
        indices = [c.index for c in contexts]
        # stream: one call on every layer's weights (their states one joint tensor), G_slow already flat
        if self.layout == "stream":
            g_flat = self.stream_gradients(indices)
        else:  # flat: the layers' sequences packed in a few calls (where the backend can)
            g_flat = self.packed_slow_gradients(indices)
        if g_flat is not None:
            g_slow = dict(zip(indices, g_flat.split([c.w_tilde.numel() for c in contexts])))
        elif self.layout == "stream":  # each layer's own carried state: the slow-net per layer
            g_slow = {i: self.slow_gradient(i) for i in indices}
        else:
            g_slow = self.slow_gradients(indices)
        # the fast-net and the combination are element-wise: one call on every layer's weights,
        # flattened and concatenated (a few operators per step instead of a few per layer)
        flat = lambda ts: torch.cat([t.reshape(-1) for t in ts])  # noqa: E731
        kinds = {(t.dtype, t.device) for c in contexts for t in (c.grad, c.calibration, c.w_tilde, g_slow[c.index])}
        if len(kinds) != 1 or any(c.calibration.shape != c.w_tilde.shape for c in contexts):  # per layer
            fast = self.fast(flat(c.w_tilde for c in contexts)).split([c.w_tilde.numel() for c in contexts])
            return [self.directions(c, g_slow[c.index], f.view_as(c.w_tilde)) for c, f in zip(contexts, fast)]
        sizes = [c.w_tilde.numel() for c in contexts]
        d, u = self.combine(flat(c.grad for c in contexts), flat(c.calibration for c in contexts),
                            self.fast(flat(c.w_tilde for c in contexts)),
                            flat(g_slow[i] for i in indices) if g_flat is None else g_flat)
        return [(dl.view_as(c.w_tilde), ul.view_as(c.w_tilde)) for c, dl, ul in zip(contexts, d.split(sizes), u.split(sizes))]

    def meta_param_groups(self) -> List[dict]:
        groups = [
            {"name": "fast", "params": list(self.fast.parameters()), "lr": self.fast_lr},
            {"name": "slow", "params": list(self.slow.parameters()), "lr": self.slow_lr},
        ]
        if self.lre is not None:
            groups.append({"name": "lre", "params": list(self.lre.parameters()), "lr": self.lre_lr})
        return groups

    def get_extra_state(self):
        return {"hgs": [list(h) for h in self.hgs],
                "stream": [list(s) if s is not None else None for s in self.stream_states]}

    def set_extra_state(self, state) -> None:
        self.hgs = [deque(h, maxlen=self.history_len) for h in state["hgs"]]
        streams = state.get("stream") or [None] * len(self.hgs)
        self.stream_states = [tuple(s) if s is not None else None for s in streams]
        self._stream_spare = [None] * len(self.stream_states)
        self.pending_stream = {}
