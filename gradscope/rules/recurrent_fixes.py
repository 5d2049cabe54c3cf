"""Verified fixes for recurrent layers: each change is made on a copy of the module.

The recurrent matrix is tied across time, so a what-if on the traced graph
cannot express it: the fix is applied to a deep copy of the small RNN module and
the estimate's unroll (``gradscope.estimate.recurrent``) runs again on it. A fix
is offered only if the first/last-step gradient ratio improves by the margin of
:func:`gradscope.rules.variants.improves`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from gradscope.estimate.recurrent import step_gain_through_time
from gradscope.records import Recommendation, Verification
from gradscope.rules.actions import recurrent_module_action
from gradscope.rules.base import fmt, signal_inputs
from gradscope.rules.variants import improves
from gradscope.tracing.nodes import node_record

if TYPE_CHECKING:
    from gradscope.rules.base import Analysis


def _recurrent_ratio(module: torch.nn.Module, analysis: Analysis, node: str) -> float | None:
    """sqrt(step gain)^(steps - 1) of ``module`` unrolled like ``node``'s layer."""
    result = analysis.estimate.recurrent.get(node)
    ins = signal_inputs(analysis.traced.graph, node)
    mom = analysis.estimate.moments.get(ins[0]) if ins else None
    if result is None or mom is None:
        return None
    try:
        gain = step_gain_through_time(module, mom[0], mom[1], int(result.steps))
    except (NotImplementedError, ValueError, RuntimeError):
        return None
    return math.sqrt(max(gain, 0.0)) ** (int(result.steps) - 1)


def _module(analysis: Analysis, node: str) -> torch.nn.Module | None:
    return analysis.traced.modules.get(node_record(analysis.traced.graph, node).module or "")


def _verified_unroll(analysis: Analysis, node: str, module: torch.nn.Module,
                     change: Callable[[torch.nn.Module], None]) -> tuple[float, float] | None:
    """(before, after) first/last-step ratios when ``change`` on a copy improves them."""
    result = analysis.estimate.recurrent[node]
    steps = int(result.steps)
    before = math.sqrt(max(result.step_gain, 0.0)) ** (steps - 1)
    fixed = copy.deepcopy(module)
    with torch.no_grad():
        change(fixed)
    after = _recurrent_ratio(fixed, analysis, node)
    if after is None or not improves(before, after):
        return None
    return before, after


def forget_bias_fix(analysis: Analysis, node: str) -> Recommendation | None:
    """Forget-gate bias 1 (3 for 100+ steps), verified by re-running the unroll on a copy."""
    module = _module(analysis, node)
    result = analysis.estimate.recurrent.get(node)
    if not isinstance(module, torch.nn.LSTM) or result is None \
            or any(p.is_meta for p in module.parameters()):
        return None
    steps = int(result.steps)
    bias = 3.0 if steps >= 100 else 1.0
    hidden = module.hidden_size

    def change(fixed: torch.nn.Module) -> None:
        for name, tensor in fixed.named_parameters():
            if name.startswith("bias_ih"):
                tensor[hidden:2 * hidden].fill_(bias)
            elif name.startswith("bias_hh"):
                tensor[hidden:2 * hidden].zero_()

    verified = _verified_unroll(analysis, node, module, change)
    if verified is None:
        return None
    before, after = verified
    path = node_record(analysis.traced.graph, node).module or node
    return Recommendation(
        "initialization",
        f"Set the forget-gate bias of {path} to {bias:g} "
        f"({'>= 3 for 100+ steps' if bias == 3 else '>= 1'}): "
        f"the predicted gradient reaching the first of {steps} steps, relative to the last, "
        f"goes from {fmt(before)} to {fmt(after)}.",
        f"lstm = model.get_submodule({path!r})\n"
        "hidden = lstm.hidden_size\n"
        "with torch.no_grad():\n"
        "    for name, bias in lstm.named_parameters():\n"
        "        if name.startswith(\"bias_ih\"):  # gate order: input, forget, cell, output\n"
        f"            bias[hidden:2 * hidden].fill_({bias:g})\n"
        "        elif name.startswith(\"bias_hh\"):\n"
        "            bias[hidden:2 * hidden].zero_()",
        Verification("first/last step gradient ratio through time (static estimate)",
                     before, after),
        action=recurrent_module_action(analysis, "lstm_forget_bias", path, module, value=bias))


def orthogonal_fix(analysis: Analysis, node: str) -> Recommendation | None:
    """Orthogonal recurrent matrices, verified by re-running the unroll on a copy."""
    module = _module(analysis, node)
    result = analysis.estimate.recurrent.get(node)
    if module is None or result is None or any(p.is_meta for p in module.parameters()):
        return None
    steps = int(result.steps)
    gen = torch.Generator().manual_seed(0)

    def change(fixed: torch.nn.Module) -> None:
        for name, tensor in fixed.named_parameters():
            if name.startswith("weight_hh"):
                rows = tensor.shape[0] // tensor.shape[1]
                for k in range(rows):  # one orthogonal block per gate
                    block = tensor[k * tensor.shape[1]:(k + 1) * tensor.shape[1]]
                    q, r = torch.linalg.qr(torch.randn(block.shape, generator=gen,
                                                       dtype=torch.float64))
                    block.copy_((q * torch.sign(torch.diagonal(r))).to(block.dtype))

    verified = _verified_unroll(analysis, node, module, change)
    if verified is None:
        return None
    before, after = verified
    path = node_record(analysis.traced.graph, node).module or node
    return Recommendation(
        "initialization",
        f"Initialise the recurrent matrices of {path} orthogonally (one block per gate): the "
        f"predicted gradient reaching the first of {steps} steps, relative to the last, goes "
        f"from {fmt(before)} to {fmt(after)}.",
        f"for name, w in model.get_submodule({path!r}).named_parameters():\n"
        "    if name.startswith(\"weight_hh\"):\n"
        "        for block in w.detach().chunk(w.shape[0] // w.shape[1]):\n"
        "            torch.nn.init.orthogonal_(block)",
        Verification("first/last step gradient ratio through time (static estimate)",
                     before, after),
        action=recurrent_module_action(analysis, "orthogonal_recurrent", path, module))


def recurrent_fixes(analysis: Analysis, node: str) -> list[Recommendation]:
    """GS103's fixes: forget bias for LSTMs, else orthogonal recurrent weights."""
    module = _module(analysis, node)
    fix = forget_bias_fix(analysis, node) if isinstance(module, torch.nn.LSTM) \
        else orthogonal_fix(analysis, node)
    return [fix] if fix is not None else []

def spectral_norm(analysis: Analysis, node: str) -> float | None:
    """Largest singular value of a vanilla RNN's recurrent matrices (GS707), None if not one."""
    module = _module(analysis, node)
    if not isinstance(module, torch.nn.RNN) or any(p.is_meta for p in module.parameters()):
        return None
    norms = [float(torch.linalg.matrix_norm(p.detach().double(), ord=2))
             for name, p in module.named_parameters() if name.startswith("weight_hh")]
    return max(norms) if norms else 0.0


def lstm_forget_bias(analysis: Analysis, node: str) -> float | None:
    """Mean forget-gate bias of an LSTM with biases (GS708), None if not one."""
    module = _module(analysis, node)
    if not isinstance(module, torch.nn.LSTM) or not module.bias \
            or any(p.is_meta for p in module.parameters()):
        return None
    hidden = module.hidden_size
    forget = [float(p.detach()[hidden:2 * hidden].double().mean())
              for name, p in module.named_parameters() if name.startswith("bias_")]
    return sum(forget) / max(module.num_layers * (2 if module.bidirectional else 1), 1)
