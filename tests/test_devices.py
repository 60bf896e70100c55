"""Device correctness without a GPU.

Every tensor rdkv_hf creates on its hot paths must live on the device of the tensors it serves, and
CPU-side bookkeeping must say ``device="cpu"``. A tensor factory called without ``device=`` lands on
the CPU however the model is placed, which on a CUDA model is a device mismatch at the first
compressed step. The audit below runs a patched model's prefill and decode (every mode, beam search,
a padded batch) under a TorchFunctionMode that records every factory call made from rdkv_hf's code
without an explicit device.
"""

import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from torch.overrides import TorchFunctionMode

import rdkv_hf
from rdkv_hf.calibration import calibrate

PACKAGE = str(Path(rdkv_hf.__file__).parent)
TORCH = str(Path(torch.__file__).parent)
FACTORIES = {
    torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.tensor, torch.as_tensor, torch.eye,
    torch.linspace, torch.randn, torch.rand, torch.randint, torch.randperm, torch.zeros_like, torch.ones_like,
    torch.empty_like, torch.full_like,
}
LIKE = {torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like}


class DeviceAudit(TorchFunctionMode):
    """Records ``file:line function`` of each factory call from rdkv_hf without ``device=``.

    ``torch.as_tensor`` of a tensor and the ``*_like`` factories keep their input's device, so they
    count only when they are given a Python object."""

    def __init__(self):
        super().__init__()
        self.violations = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and "device" not in kwargs:
            keeps_device = (func in LIKE or func is torch.as_tensor) and args and isinstance(args[0], torch.Tensor)
            if not keeps_device:
                frame = sys._getframe(1)
                while frame is not None and frame.f_code.co_filename.startswith(TORCH):
                    frame = frame.f_back
                if frame is not None and frame.f_code.co_filename.startswith(PACKAGE):
                    where = f"{Path(frame.f_code.co_filename).relative_to(PACKAGE)}:{frame.f_lineno} {func.__name__}"
                    self.violations.append(where)
        return func(*args, **kwargs)


@pytest.fixture(scope="module")
def profile():
    model = tiny_model("llama")
    ids = torch.randint(1, 128, (3, 40), generator=torch.Generator().manual_seed(0))
    return calibrate(model, ids, progress=False)


@pytest.mark.parametrize("mode", ["rdkv", "rdkv+profile", "ratequant", "uniform"])
def test_no_tensor_factory_without_a_device_on_the_hot_paths(mode, profile, one_thread):
    model = tiny_model("llama")
    # head_dim 16: a V token's scale and minimum cost 2 bits an element, beyond 2.5 for the fixed-width modes
    budget = 3.5 if mode in ("ratequant", "uniform") else 2.5
    kw = dict(budget=budget, mode=mode, profile=profile if mode in ("rdkv+profile", "ratequant") else None)
    rdkv_hf.patch(model, **kw)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 128, (2, 48), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    audit = DeviceAudit()
    with audit:
        model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
        model.generate(ids[:1], max_new_tokens=3, num_beams=2, do_sample=False, pad_token_id=0)
        for backend in ("torch", "cpu"):
            rdkv_hf.patch(model, **kw, backend=backend)
            model.generate(ids[:1], max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert not audit.violations, "tensor factories without device= on rdkv_hf's hot paths:\n" + "\n".join(sorted(set(audit.violations)))


def test_the_audit_catches_a_factory_without_a_device():
    """The audit must be able to fail: a factory called from a file of the package is reported."""
    audit = DeviceAudit()
    code = compile("import torch\nx = torch.zeros(3)\ny = torch.zeros(3, device='cpu')\n", f"{PACKAGE}/fake_module.py", "exec")
    with audit:
        exec(code, {})
    assert audit.violations == ["fake_module.py:2 zeros"]


def test_eviction_baselines_pass_the_audit(one_thread):
    from rdkv_hf.cache import RDKVCache
    from rdkv_hf.config import RDKVConfig
    from rdkv_hf.planners import modes

    model = tiny_model("llama")
    rdkv_hf.patch(model, budget=16)
    ids = torch.randint(1, 128, (2, 40), generator=torch.Generator().manual_seed(2))
    audit = DeviceAudit()
    with audit:
        for cls in (c for c in modes().values() if c.evicts_only):
            cache = RDKVCache(model.config, planner=cls(RDKVConfig(budget=4.0)))
            model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0, **rdkv_hf.compat.cache_kwargs(cache))
    assert not audit.violations, "\n".join(sorted(set(audit.violations)))
