"""Several independent sequences in one row: the layout for a scan with ``resets``.

A Mamba block is a causal convolution of width ``d_conv`` followed by a selective scan. Sequences
``s_1, s_2, ...`` laid out one after another in a row as::

    s_1, 0 … 0, s_2, 0 … 0, s_3, …       (gap = d_conv − 1 zero tokens between consecutive ones)

with ``resets`` True at each sequence's first token (the scan's state restarts there) give, at
each sequence's positions, the block's outputs on that sequence alone: the convolution reaches
back ``d_conv − 1`` tokens, which are the gap's zeros, exactly the causal padding a sequence
alone has, and the scan starts from a zero state. The outputs at the gap positions are
meaningless and carry no gradient if unused. One call on the row then replaces one call per
sequence (far fewer kernel launches on a GPU).
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["packed_starts", "pack_sequences"]


def packed_starts(lengths: Sequence[int], gap: int) -> Tuple[List[int], int]:
    """``(starts, total)``: each sequence's first position in the row and the row's length, for
    sequences of ``lengths`` separated by ``gap`` tokens."""
    if gap < 0 or any(n < 1 for n in lengths):
        raise ValueError(f"packed sequences need lengths >= 1 and gap >= 0, got lengths {list(lengths)}, gap {gap}")
    starts, pos = [], 0
    for n in lengths:
        starts.append(pos)
        pos += n + gap
    return starts, max(0, pos - gap)


def pack_sequences(seqs: Sequence[Tensor], gap: int) -> Tuple[Tensor, Tensor, List[int]]:
    """``(row (1, total, d), resets (1, total) bool, starts)`` for the sequences ``seqs`` (each
    ``(T_i, d)``, one dtype and device), ``gap`` zeros between consecutive ones (``d_conv − 1``
    for a Mamba block; see the module docstring). Sequence ``i``'s outputs are
    ``out[0, starts[i]:starts[i] + T_i]``."""
    starts, total = packed_starts([s.shape[0] for s in seqs], gap)
    first = seqs[0]
    zeros = first.new_zeros(gap, *first.shape[1:])
    parts = [p for i, s in enumerate(seqs) for p in ((zeros, s) if i else (s,))]
    resets = torch.zeros(1, total, dtype=torch.bool, device=first.device)
    resets[0, starts] = True
    return torch.cat(parts).unsqueeze(0), resets, starts
