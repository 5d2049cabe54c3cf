"""Naming of graph operations, shared by every tracer.

Three tracers produce three vocabularies: ``symbolic_trace`` gives modules,
torch functions and tensor methods; ``torch.export`` gives aten overloads
(``aten.relu.default``); the runtime recorder gives modules and torch
functions. The estimator and the probe should not care which one ran, so
every node gets a display ``op`` (module class or function name, as users know
it) and a canonical ``key`` that the estimator dispatches on.
"""

from __future__ import annotations

import functools
import operator
from typing import Any

#: Module classes whose forward the estimator models as one unit. Everything
#: else with children is traced through; a childless module of another class
#: is kept whole and treated as an unknown op.
MODULE_KEYS: dict[str, str] = {
    "Linear": "linear",
    "LazyLinear": "linear",
    "NonDynamicallyQuantizableLinear": "linear",
    "Bilinear": "bilinear",
    "Conv1d": "conv",
    "Conv2d": "conv",
    "Conv3d": "conv",
    "LazyConv1d": "conv",
    "LazyConv2d": "conv",
    "LazyConv3d": "conv",
    "ConvTranspose1d": "conv_transpose",
    "ConvTranspose2d": "conv_transpose",
    "ConvTranspose3d": "conv_transpose",
    "Embedding": "embedding",
    "EmbeddingBag": "embedding_bag",
    "BatchNorm1d": "batch_norm",
    "BatchNorm2d": "batch_norm",
    "BatchNorm3d": "batch_norm",
    "SyncBatchNorm": "batch_norm",
    "LayerNorm": "layer_norm",
    "GroupNorm": "group_norm",
    "RMSNorm": "rms_norm",
    "InstanceNorm1d": "instance_norm",
    "InstanceNorm2d": "instance_norm",
    "InstanceNorm3d": "instance_norm",
    "LocalResponseNorm": "local_response_norm",
    "Dropout": "dropout",
    "Dropout1d": "dropout",
    "Dropout2d": "dropout",
    "Dropout3d": "dropout",
    "AlphaDropout": "dropout",
    "FeatureAlphaDropout": "dropout",
    "MaxPool1d": "max_pool",
    "MaxPool2d": "max_pool",
    "MaxPool3d": "max_pool",
    "AdaptiveMaxPool1d": "max_pool",
    "AdaptiveMaxPool2d": "max_pool",
    "AdaptiveMaxPool3d": "max_pool",
    "AvgPool1d": "avg_pool",
    "AvgPool2d": "avg_pool",
    "AvgPool3d": "avg_pool",
    "AdaptiveAvgPool1d": "avg_pool",
    "AdaptiveAvgPool2d": "avg_pool",
    "AdaptiveAvgPool3d": "avg_pool",
    "Flatten": "view",
    "Unflatten": "view",
    "Identity": "view",
    "Softmax": "softmax",
    "Softmax2d": "softmax",
    "LogSoftmax": "log_softmax",
    "MultiheadAttention": "mha",
    "LSTM": "rnn",
    "GRU": "rnn",
    "RNN": "rnn",
    "LSTMCell": "rnn_cell",
    "GRUCell": "rnn_cell",
    "RNNCell": "rnn_cell",
}

#: Modules with children that are still kept whole (tracing into them fails or
#: loses nothing the estimator could use).
LEAF_WITH_CHILDREN = frozenset({"MultiheadAttention"})

#: Function, method and aten names (overload stripped, trailing ``_`` of in-place
#: variants stripped) to canonical keys. Activations are resolved separately.
FUNCTION_KEYS: dict[str, str] = {
    # weight layers
    "linear": "linear",
    "addmm": "addmm",
    "conv1d": "conv",
    "conv2d": "conv",
    "conv3d": "conv",
    "convolution": "conv",
    "_convolution": "conv",
    "conv_transpose1d": "conv_transpose",
    "conv_transpose2d": "conv_transpose",
    "conv_transpose3d": "conv_transpose",
    "embedding": "embedding",
    # normalisation
    "batch_norm": "batch_norm",
    "native_batch_norm": "batch_norm",
    "_native_batch_norm_legit": "batch_norm",
    "_native_batch_norm_legit_functional": "batch_norm",
    "_native_batch_norm_legit_no_training": "batch_norm",
    "_batch_norm_with_update": "batch_norm",
    "_batch_norm_no_update": "batch_norm",
    "cudnn_batch_norm": "batch_norm",
    "layer_norm": "layer_norm",
    "native_layer_norm": "layer_norm",
    "group_norm": "group_norm",
    "native_group_norm": "group_norm",
    "instance_norm": "instance_norm",
    "rms_norm": "rms_norm",
    "_fused_rms_norm": "rms_norm",
    "normalize": "l2_normalize",
    # regularisation
    "dropout": "dropout",
    "native_dropout": "dropout",
    "feature_dropout": "dropout",
    "alpha_dropout": "dropout",
    "dropout1d": "dropout",
    "dropout2d": "dropout",
    "dropout3d": "dropout",
    # pooling and reductions
    "max_pool1d": "max_pool",
    "max_pool2d": "max_pool",
    "max_pool3d": "max_pool",
    "max_pool1d_with_indices": "max_pool",
    "max_pool2d_with_indices": "max_pool",
    "max_pool3d_with_indices": "max_pool",
    "adaptive_max_pool1d": "max_pool",
    "adaptive_max_pool2d": "max_pool",
    "adaptive_max_pool3d": "max_pool",
    "avg_pool1d": "avg_pool",
    "avg_pool2d": "avg_pool",
    "avg_pool3d": "avg_pool",
    "adaptive_avg_pool1d": "avg_pool",
    "adaptive_avg_pool2d": "avg_pool",
    "adaptive_avg_pool3d": "avg_pool",
    "_adaptive_avg_pool2d": "avg_pool",
    "_adaptive_avg_pool3d": "avg_pool",
    "mean": "mean",
    "sum": "sum",
    "amax": "max_reduce",
    "max": "max_reduce",
    "amin": "max_reduce",
    "min": "max_reduce",
    "logsumexp": "max_reduce",
    # attention and softmax
    "softmax": "softmax",
    "_softmax": "softmax",
    "_safe_softmax": "softmax",
    "log_softmax": "log_softmax",
    "_log_softmax": "log_softmax",
    "scaled_dot_product_attention": "sdpa",
    # recurrent cells, as torch.export keeps them (one aten op per call)
    "lstm_cell": "rnn_cell",
    "gru_cell": "rnn_cell",
    "rnn_tanh_cell": "rnn_cell",
    "rnn_relu_cell": "rnn_cell",
    "_scaled_dot_product_flash_attention_for_cpu": "sdpa",
    "_scaled_dot_product_efficient_attention": "sdpa",
    "_scaled_dot_product_flash_attention": "sdpa",
    # arithmetic
    "add": "add",
    "iadd": "add",
    "radd": "add",
    "sub": "sub",
    "isub": "sub",
    "rsub": "rsub",
    "mul": "mul",
    "imul": "mul",
    "rmul": "mul",
    "truediv": "div",
    "div": "div",
    "itruediv": "div",
    "neg": "neg",
    "matmul": "matmul",
    "mm": "matmul",
    "bmm": "matmul",
    "baddbmm": "matmul",
    "einsum": "einsum",
    # mixture-of-experts: token rows (sorted by expert) times their expert's matrix,
    # (S, K) x (G, K, N) -> (S, N); per row exactly a matmul
    "_grouped_mm": "matmul",
    "grouped_mm": "matmul",
    "grouped_mm_fallback": "matmul",
    "pow": "pow",
    "square": "square",
    "sqrt": "sqrt",
    "rsqrt": "rsqrt",
    "reciprocal": "reciprocal",
    "exp": "exp",
    "log": "log",
    "abs": "abs",
    "clamp": "clamp",
    "clip": "clamp",
    "clamp_min": "clamp",
    "clamp_max": "clamp",
    "where": "where",
    "masked_fill": "masked_fill",
    # routing: values move, the gradient's squared norm is kept
    "view": "view",
    "_unsafe_view": "view",
    "reshape": "view",
    "flatten": "view",
    "unflatten": "view",
    "squeeze": "view",
    "unsqueeze": "view",
    "permute": "view",
    "transpose": "view",
    "t": "view",
    "contiguous": "view",
    "clone": "view",
    "alias": "view",
    "view_as": "view",
    "reshape_as": "view",
    "expand": "view",
    "expand_as": "view",
    "repeat": "view",
    "repeat_interleave": "view",
    "tile": "view",
    "flip": "view",
    "roll": "view",
    "movedim": "view",
    "swapaxes": "view",
    "lift_fresh_copy": "view",
    "to": "view",
    "type": "view",
    "type_as": "view",
    "float": "view",
    "double": "view",
    "half": "view",
    "bfloat16": "view",
    "_to_copy": "view",
    "copy": "view",
    "getitem": "getitem",
    "slice": "view",
    "select": "view",
    "narrow": "view",
    "index": "view",
    "index_select": "view",
    "gather": "view",
    "pad": "view",
    "constant_pad_nd": "view",
    "cat": "cat",
    "concat": "cat",
    "concatenate": "cat",
    "stack": "cat",
    "hstack": "cat",
    "vstack": "cat",
    "split": "split",
    "split_with_sizes": "split",
    "chunk": "split",
    "unbind": "split",
    "tensor_split": "split",
    "detach": "detach",
    "zeros_like": "constant",
    "ones_like": "constant",
    "full_like": "constant",
    "empty_like": "constant",
    "rand_like": "constant",
    "randn_like": "constant",
}

# ---------------------------------------------------------------------------
# Op families: the one table every stage reads
#
# The estimate, the probe, the rules and the fixes each ask "is this a weight
# layer / a normalisation / a saturating activation?". They ask here, so that
# the answers cannot drift apart between stages.

#: Dense weight layers: what depth counts, what a skip goes around, what is re-initialised.
DENSE_KEYS: tuple[str, ...] = ("linear", "conv", "addmm", "conv_transpose")
#: Dense layers whose fan-in the re-initialisation fix can read off the weight.
REINIT_KEYS: tuple[str, ...] = ("linear", "conv", "addmm")
#: Normalisation layers (a plain run of weight layers is broken by none of them,
#: but GS702/GS704 ask whether they are present).
NORM_KEYS: tuple[str, ...] = ("batch_norm", "layer_norm", "group_norm", "instance_norm",
                              "rms_norm")
#: Functions that normalise when written out by hand (``x / x.std()``).
NORM_FUNCTIONS: tuple[str, ...] = ("rsqrt", "var", "std", "var_mean", "std_mean", "norm",
                                   "normalize")
#: Saturating activations: |z| beyond which the derivative is below 1% of its maximum
#: (GS301/GS302 count the pre-activations past it).
SATURATION_EDGE: dict[str, float] = {"sigmoid": 5.986, "tanh": 2.993, "hardtanh": 1.0,
                                     "hardsigmoid": 3.0, "softsign": 9.0}
#: Activations whose swap for a non-saturating one the fixes try (logsigmoid has
#: a flat tail on one side only, so GS30x does not measure it, but a swap helps).
SATURATING: tuple[str, ...] = ("sigmoid", "tanh", "softsign", "hardsigmoid", "hardtanh",
                               "logsigmoid")
#: Activations with a hard zero: units die when their input stays negative (GS401/GS402).
RELU_LIKE: tuple[str, ...] = ("relu", "relu6")
#: Ops that average over positions: the gradient norm shrinks by design, not by decay.
AVERAGING_KEYS: tuple[str, ...] = ("avg_pool", "mean")
#: Recurrent layers unrolled over time by the estimate.
RECURRENT_KEYS: tuple[str, ...] = ("rnn", "rnn_cell")
#: Attention.
ATTENTION_KEYS: tuple[str, ...] = ("mha", "sdpa")

#: family name -> keys in it (``activation:<name>`` keys are resolved by name).
FAMILIES: dict[str, tuple[str, ...]] = {
    "weight": (*DENSE_KEYS, "bilinear", "embedding", "embedding_bag"),
    "normalisation": (*NORM_KEYS, "l2_normalize", "local_response_norm"),
    "averaging": AVERAGING_KEYS,
    "recurrent": RECURRENT_KEYS,
    "attention": ATTENTION_KEYS,
    "add": ("add",),
    "dropout": ("dropout",),
    "view": ("view",),
}
_FAMILY_OF_KEY = {key: family for family, keys in FAMILIES.items() for key in keys}


def family_of(key: str, role: str = "compute") -> str:
    """The op family of a node's key: ``input``, ``param``, one of :data:`FAMILIES`,
    ``saturating``, ``relu_like``, ``activation`` (other elementwise activations), or
    ``other``."""
    if role in ("input", "param"):
        return role
    if key.startswith("activation:"):
        name = key.split(":", 1)[1]
        if name in SATURATING:
            return "saturating"
        if name in RELU_LIKE:
            return "relu_like"
        return "activation"
    return _FAMILY_OF_KEY.get(key, "other")


#: Nodes that never carry a gradient and are not analysed: shape queries,
#: asserts and the like.
IGNORED = frozenset(
    {
        "size",
        "dim",
        "numel",
        "sym_size",
        "sym_numel",
        "sym_stride",
        "_assert_tensor_metadata",
        "_assert_scalar",
        "_assert_async",
        "sym_constrain_range_for_size",
        "_set_grad_enabled",
    }
)


#: Tensor properties that are ops, by the function name they stand for.
_PROPERTIES = {"T": "t", "mT": "transpose", "H": "t", "mH": "transpose", "data": "detach"}


def function_name(target: Any) -> str:
    """The bare name of a call target: ``aten.relu.default`` -> ``relu``, ``operator.add``
    -> ``add``.

    In-place suffixes are dropped (``relu_`` -> ``relu``) because the gradient
    treats them alike.
    """
    if isinstance(target, str):
        name = target
    elif getattr(target, "__name__", None) == "__get__" and \
            hasattr(getattr(target, "__self__", None), "__name__"):
        # A tensor property read under a TorchFunctionMode (the runtime recorder): the
        # descriptor's ``__get__``; ``weight.T`` (Falcon's linear layers) is a transpose.
        attr = target.__self__.__name__
        return _PROPERTIES.get(attr, attr)
    else:
        text = str(target)
        if text.startswith("aten.") or text.startswith("prims."):
            name = text.split(".")[1]
        else:
            name = getattr(target, "__name__", None) or text
    if target in (operator.getitem,):
        return "getitem"
    name = name.strip("_") if name.startswith("__") and name.endswith("__") else name
    if name.endswith("_") and not name.startswith("_"):
        name = name[:-1]
    return name


def canonical_key(name: str, activation: str | None) -> str:
    """The estimator's key for a function or method name; ``activation:<name>`` for activations."""
    if activation is not None:
        return f"activation:{activation}"
    if name in FUNCTION_KEYS:
        return FUNCTION_KEYS[name]
    # custom-namespace operators keep their overload (``grouped_mm_fallback.default``)
    return FUNCTION_KEYS.get(name.split(".", 1)[0], "unknown")


def module_key(class_name: str, activation: str | None) -> str:
    """The estimator's key for a module kept whole in the graph."""
    if activation is not None:
        return f"activation:{activation}"
    return MODULE_KEYS.get(class_name, "unknown")


# ---------------------------------------------------------------------------
# Activations: one canonical name whatever the tracer called it

# Keys are lower-cased with underscores removed, so "LeakyReLU", "leaky_relu" and
# "aten.leaky_relu_.default" all meet at "leakyrelu".
_NAME_TABLE: dict[str, str] = {
    "identity": "identity",
    "relu": "relu",
    "relu6": "relu6",
    "leakyrelu": "leaky_relu",
    "prelu": "prelu",
    "prelukernel": "prelu",  # aten._prelu_kernel, what F.prelu traces to
    "elu": "elu",
    "celu": "celu",
    "selu": "selu",
    "gelu": "gelu",
    "silu": "silu",
    "swish": "silu",
    "mish": "mish",
    "tanh": "tanh",
    "sigmoid": "sigmoid",
    "expit": "sigmoid",  # torch.special.expit
    "hardsigmoid": "hardsigmoid",
    "hardswish": "hardswish",
    "hardtanh": "hardtanh",
    "softplus": "softplus",
    "softsign": "softsign",
    "logsigmoid": "logsigmoid",
    "logsigmoidforward": "logsigmoid",  # aten.log_sigmoid_forward: output 0 is the activation
    "tanhshrink": "tanhshrink",
    "hardshrink": "hardshrink",
    "softshrink": "softshrink",
}


@functools.lru_cache(maxsize=4096)
def canonical_activation(name: str) -> str | None:
    """Canonical activation name for a module class, function or aten op name, else None.

    Why so lenient: the tracer sees the same activation as ``nn.GELU``, ``F.gelu``,
    ``torch.ops.aten.gelu.default`` or ``"aten::gelu"`` depending on how the model was
    written and traced, and the estimator must treat them alike. Non-activation names (``linear``,
    ``add``, ``aten.gelu_backward``...) give None rather than an error so the caller can ask
    about every node.
    """
    text = name.strip()
    if text.startswith("<") and text.endswith(">"):  # str(type(module)) or a repr
        text = text.strip("<>").replace("class ", "").strip("'\" ")
    text = text.replace("::", ".")
    parts = [part for part in text.split(".") if part]
    if not parts:
        return None
    if "aten" in parts:
        # aten.<op>.<overload>: the overload (default, Tensor, out...) says nothing about phi.
        index = parts.index("aten")
        if index + 1 >= len(parts):
            return None
        op = parts[index + 1]
    else:
        op = parts[-1]
    key = op.lower().replace("_", "")
    return _NAME_TABLE.get(key)


def is_activation(name: str) -> bool:
    """Whether ``name`` is an elementwise activation this module can take moments of."""
    return canonical_activation(name) is not None
