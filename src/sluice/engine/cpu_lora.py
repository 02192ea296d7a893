"""A fix for vLLM 0.32's LoRA kernels on CPU, loaded into every vLLM process as a vLLM
general plugin (the `vllm.general_plugins` entry point in pyproject.toml).

The bug: `bgmv_shrink`, `bgmv_expand` and `bgmv_expand_slice` in
`vllm/lora/ops/torch_ops/lora_ops.py` gather adapter weights with the batch's adapter
indices, where -1 means "no adapter"; Python's negative indexing reads the *last* adapter
slot instead, so a base-model request batched next to a LoRA request silently gets the
adapter (upstream pull requests vllm-project/vllm#48421 and #49656). Single requests are
right; mixed batches are not. The fix zeroes the input rows whose index is -1 and clamps the
index to 0, so those rows add nothing. It must run in the engine core and worker processes
too, which vLLM spawns on CPU and which load general plugins themselves.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

FIXED_VERSIONS = ("0.32.",)  # the releases whose CPU kernels have the bug
KERNELS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")


def _without_negative_indices(kernel: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(kernel)
    def fixed(inputs: Any, weights: Any, output: Any, indices: Any, *args: Any, **kw: Any) -> Any:
        negative = indices < 0
        if bool(negative.any()):
            inputs = inputs.masked_fill(negative.view(-1, *([1] * (inputs.dim() - 1))), 0)
            indices = indices.clamp(min=0)
        return kernel(inputs, weights, output, indices, *args, **kw)

    fixed.sluice_fixed = True  # type: ignore[attr-defined]
    return fixed


def apply() -> None:
    """Patch the CPU LoRA kernels of the affected vLLM releases; a no-op elsewhere."""
    import vllm
    from vllm.platforms import current_platform

    if not vllm.__version__.startswith(FIXED_VERSIONS) or not current_platform.is_cpu():
        return
    import vllm.lora.ops.torch_ops as package
    import vllm.lora.ops.torch_ops.lora_ops as ops
    import vllm.lora.punica_wrapper.punica_cpu as punica_cpu

    for name in KERNELS:
        kernel = getattr(ops, name)
        if getattr(kernel, "sluice_fixed", False):
            continue
        fixed = _without_negative_indices(kernel)
        for module in (ops, package, punica_cpu):  # sgmv_* look bgmv_* up in these modules
            if hasattr(module, name):
                setattr(module, name, fixed)
