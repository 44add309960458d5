import os

import pytest
import torch

# Triton kernels run on CPU tensors under Triton's interpreter, which must be chosen before
# triton is first imported (by any test): on a machine without CUDA, choose it here.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fsg.models import MLP


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def make_task(n=96, d=8, k=3, seed=0):
    """A small learnable classification task: labels = argmax(x·T) for a fixed random T."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    t = torch.randn(d, k, generator=g)
    return x, (x @ t).argmax(1)


def make_mlp(seed=0, d=8, hidden=12, k=3):
    torch.manual_seed(seed)
    return MLP(d, [hidden], k)


def finish_after_a_meta_step(module, finish):
    """Call a streamed state's ``finish()`` while ``module``'s parameters are changed (by 0.1, as a
    meta step between the forward and ``finish()`` would), then restore them."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1)
    finish()
    with torch.no_grad():
        for p in module.parameters():
            p.sub_(0.1)


@pytest.fixture
def one_thread():
    """One torch thread for the test (small-op CLI runs are faster and less noisy so)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def fsg_cli(capsys, *args):
    """Run ``fsg ARGS`` in-process: ``(exit code, stdout, stderr)``."""
    from fsg.cli.app import main

    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def cli_error(capsys, *args):
    """Run ``fsg ARGS`` expecting a usage error: exit status 2 and one line ``fsg: error: ...``."""
    from fsg.cli.app import main

    with pytest.raises(SystemExit) as info:
        main(list(args))
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert err.startswith("fsg: error: ") and err.count("\n") == 1, err
    return err


def interrupt_at_batch(monkeypatch, n):
    """Make the data pipeline raise KeyboardInterrupt when the ``n``-th training batch (counted
    over every loader and epoch) is fetched, as a Ctrl-C between two steps would."""
    import fsg.data

    original = fsg.data.DataLoader.__iter__
    fetched = {"n": 0}

    def iterate(self):
        for item in original(self):
            if self.train:
                fetched["n"] += 1
                if fetched["n"] == n:
                    raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(fsg.data.DataLoader, "__iter__", iterate)


def tensor_leaves(obj, path="state"):
    """``(path, tensor)`` for every tensor in nested dicts/lists/tuples (``state.a[0].b``)."""
    if torch.is_tensor(obj):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from tensor_leaves(v, f"{path}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from tensor_leaves(v, f"{path}[{i}]")


@pytest.fixture(scope="module")
def fast_triton_interpreter():
    """Under the interpreter: scan one step along the scan axis at a time (vectorised over the
    other axes) instead of one element at a time, and skip re-patching triton.language at every
    nested @triton.jit call (the kernel launch has already patched it). Interpreter-only speed-ups
    for Triton test modules (``pytestmark = pytest.mark.usefixtures(...)``); they do not change
    what the kernels compute."""
    if torch.cuda.is_available():
        yield
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter as ti

    orig_scan, orig_patch = getattr(ti.ScanOps, "generic_scan", None), getattr(ti, "_patch_lang", None)

    def generic_scan(self, input):
        data = [a.handle.data for a in input]
        outs, acc = [np.empty_like(x) for x in data], None
        for i in range(data[0].shape[self.axis]):
            sl = (slice(None),) * self.axis + (slice(i, i + 1),)
            cur = tuple(self.to_tensor(x[sl], a.dtype) for x, a in zip(data, input))
            acc = cur if acc is None else self.combine_fn.fn(*acc, *cur)
            acc = acc if isinstance(acc, tuple) else (acc,)
            for o, a in zip(outs, acc):
                o[sl] = a.handle.data
        return [self.to_tensor(o, a.dtype) for o, a in zip(outs, input)]

    def patch_lang(fn):
        mods = [v for v in fn.__globals__.values() if v is tl or v is tl.core]
        if mods and not any(tl.core.is_builtin(m.program_id) for m in mods):
            return ti._LangPatchScope()
        return orig_patch(fn)

    if orig_scan is not None and orig_patch is not None and hasattr(ti, "_LangPatchScope"):
        ti.ScanOps.generic_scan, ti._patch_lang = generic_scan, patch_lang
    yield
    if orig_scan is not None and orig_patch is not None:
        ti.ScanOps.generic_scan, ti._patch_lang = orig_scan, orig_patch
