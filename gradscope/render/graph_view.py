"""The module hierarchy of the HTML report: the model as a foldable tree, coloured by health.

The JSON report lists graph nodes (``layers``) in execution order, each with the
module path it ran in (``encoder.layers.0.linear1``) or none (free functions at
the top level, the input placeholders). :func:`graph_view` turns that list into
a tree keyed by the path's segments whose leaves are the layers, and gives
every tree node the colour of the worst layer below it, so that a model of
thousands of nodes can be read top down: open the red branch.

A layer's colour is its ``health_class``, the class the rules judged it with
(``gradscope.rules.health``): ``ok``, ``warn`` or ``bad`` against the report's own
thresholds, ``none`` for a layer no rule judges (``health_note`` says why; only
the entry layers are judged). The figure shown is ``health``, the gradient-norm
ratio to the output the verdict used. Nothing is re-classified here, so the
colours cannot disagree with the findings. A document without health fields
(written by an older gradscope) shows every layer as ``none``.

Residual connections are shown as a ``skip`` badge on the ``add`` that closes
them, naming the layer the skip comes from; the ``inputs`` edges of the report
say which. Documents without edges fall back to a heuristic from module paths
only (see :func:`_skips_without_edges`).

Nothing here imports torch or formats HTML: the template ``_graph.html.j2``
lays the tree out, with Jinja's autoescaping on every model string.
"""

from __future__ import annotations

import base64
import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

from markupsafe import Markup

from gradscope.render.jinja import environment

TEMPLATE_NAME = "_graph.html.j2"

#: Display names of the ops that add tensors (``operator.add``, ``x += y``, ``torch.add``).
ADD_OPS = frozenset({"add", "iadd", "radd", "add_"})

#: Tree nodes deeper than this start folded; the top level (depth 1) is open.
OPEN_DEPTH = 1

#: The report's health classes and the CSS class of each (not judged, ``null``: ``none``).
CSS_CLASS = {"ok": "ok", "warn": "warn", "bad": "bad"}
#: Worse classes first when a module takes the colour of its worst layer.
_CLASS_RANK = {"none": 0, "ok": 1, "warn": 2, "bad": 3}

#: "Expand all"/"Collapse all": set ``open`` on every ``details.module``. Kept
#: here, not in the template, so its CSP hash is computed over exactly the text
#: that is emitted. No model string ever reaches it.
GRAPH_SCRIPT = (
    '(function(){function s(o){var d=document.querySelectorAll("details.module");'
    "for(var i=0;i<d.length;i++){d[i].open=o;}}"
    'var e=document.getElementById("graph-expand"),c=document.getElementById("graph-collapse");'
    'if(e){e.addEventListener("click",function(){s(true);});}'
    'if(c){c.addEventListener("click",function(){s(false);});}})();'
)

#: The CSP source that allows exactly :data:`GRAPH_SCRIPT`:
#: ``script-src 'sha256-...'`` in the page's Content-Security-Policy.
GRAPH_SCRIPT_CSP = (
    "'sha256-" + base64.b64encode(hashlib.sha256(GRAPH_SCRIPT.encode()).digest()).decode() + "'"
)

def layer_ratio(layer: Mapping[str, Any]) -> float | None:
    """The layer's gradient health figure (``health``), None when it has none."""
    value = layer.get("health")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def health_class(layer: Mapping[str, Any]) -> str:
    """The CSS class of a layer: its judged ``health_class``, ``none`` when not judged."""
    return CSS_CLASS.get(str(layer.get("health_class")), "none")


def _badness(layer: Mapping[str, Any]) -> tuple[int, float]:
    """Order of layers by how bad they look: class first, then decades from 1."""
    ratio = layer_ratio(layer)
    distance = math.inf if ratio is None or not math.isfinite(ratio) or ratio <= 0 \
        else abs(math.log10(ratio))
    return _CLASS_RANK[health_class(layer)], distance if ratio is not None else -1.0


def fmt_ratio(ratio: float | None) -> str:
    """``1.23e-04`` like the rest of the report; an en dash for no figure."""
    if ratio is None:
        return "\u2013"
    if not math.isfinite(ratio):
        return str(ratio)
    if ratio == 0.0:
        return "0"
    return f"{ratio:.2e}"


class _Module:
    """A tree node while the tree is built: children in order of first execution."""

    __slots__ = ("children", "depth", "name", "path", "subs")

    def __init__(self, name: str, path: str, depth: int) -> None:
        self.name = name
        self.path = path
        self.depth = depth
        #: ("module", _Module) or ("layer", index into the layer list).
        self.children: list[tuple[str, Any]] = []
        self.subs: dict[str, _Module] = {}

    def sub(self, name: str) -> _Module:
        child = self.subs.get(name)
        if child is None:
            path = f"{self.path}.{name}" if self.path else name
            child = _Module(name, path, self.depth + 1)
            self.subs[name] = child
            self.children.append(("module", child))
        return child


def _segments(module: Any) -> list[str]:
    if not isinstance(module, str) or not module:
        return []
    return [s for s in module.split(".") if s] or [module]


def _short_label(node: str, mod: _Module) -> str:
    """A node's name without the module prefix the tree already shows.

    Tracers name nodes after their module path (``encoder_layers_0_attn_softmax``
    in ``encoder.layers.0.attn``): inside that module ``softmax`` says the same.
    Repeated calls of one module (``..._attn_c_attn_3`` in ``...attn.c_attn``)
    keep the module's own name, ``c_attn_3``, rather than a bare number.
    """
    if not mod.path:
        return node
    prefix = mod.path.replace(".", "_") + "_"
    if node == prefix[:-1]:
        return mod.name
    rest = node[len(prefix):] if node.startswith(prefix) else ""
    if not rest:
        return node
    return f"{mod.name}_{rest}" if rest.isdigit() else rest


def _is_add(layer: Mapping[str, Any]) -> bool:
    return str(layer.get("op", "")).lower() in ADD_OPS


def _skips_from_edges(layers: Sequence[Mapping[str, Any]]) -> dict[int, str]:
    """Residual adds: an add of two (or more) distinct layers; the skip is the earliest one.

    Inputs that are not layers (weights, constants) do not count, so ``x + bias``
    is no skip. The branch is the input computed last; the other input is where
    the skip starts, and the badge names it.
    """
    index = {str(layer.get("name")): i for i, layer in enumerate(layers)}
    skips: dict[int, str] = {}
    for i, layer in enumerate(layers):
        if not _is_add(layer):
            continue
        sources = [str(n) for n in dict.fromkeys(layer.get("inputs") or []) if str(n) in index]
        if len(sources) < 2:
            continue
        skips[i] = min(sources, key=lambda n: index[n])
    return skips


def _skips_without_edges(layers: Sequence[Mapping[str, Any]]) -> dict[int, str]:
    """Without edges: an add whose previous layer ran inside a different module.

    The usual residual ``x + block(x)`` runs the add in the enclosing module right
    after the branch's last layer, which belongs to a submodule (or another
    module): the add then merges outputs of two distinct module parents. The
    skip's origin is unknown, so the badge carries an empty source.
    """
    skips: dict[int, str] = {}
    for i, layer in enumerate(layers):
        if i == 0 or not _is_add(layer):
            continue
        here, before = layer.get("module") or "", layers[i - 1].get("module") or ""
        if before != here:
            skips[i] = ""
    return skips


def _has_edges(layers: Sequence[Mapping[str, Any]]) -> bool:
    return any("inputs" in layer for layer in layers)


def graph_view(doc: Mapping[str, Any]) -> dict[str, Any] | None:
    """The module tree of a JSON report document, ready for ``_graph.html.j2``; None if no layers.

    Returns ``{"children", "count", "worst", "css", "has_edges", "num_skips",
    "num_modules", "script", "script_csp"}`` where ``children`` lists, in
    execution order, tree nodes of two kinds:

    * modules: ``{"kind": "module", "name", "path", "depth", "open", "count",
      "worst", "css", "children"}`` (``count`` layers below, ``worst`` the
      formatted worst ratio among them, ``css`` its class);
    * layers: ``{"kind": "layer", "node", "label", "op", "ratio", "css",
      "skip", "skip_from"}``; a module path with exactly one layer and no
      submodules is shown as that layer, labelled with the path's last segment;
      other layers are labelled by node name less the enclosing module's prefix
      (``node`` keeps the full name).
      ``skip`` is true on residual adds and ``skip_from`` names the layer the
      skip starts at (empty where the document has no edges).
    """
    layers: list[Mapping[str, Any]] = [
        layer for layer in (doc.get("layers") or []) if isinstance(layer, Mapping)
    ]
    if not layers:
        return None
    has_edges = _has_edges(layers)
    skips = _skips_from_edges(layers) if has_edges else _skips_without_edges(layers)

    root = _Module("", "", 0)
    for i, layer in enumerate(layers):
        node = root
        for segment in _segments(layer.get("module")):
            node = node.sub(segment)
        node.children.append(("layer", i))

    ratios = [layer_ratio(layer) for layer in layers]
    nonfinite = [bool(layer.get("nonfinite_forward") or layer.get("nonfinite_backward"))
                 for layer in layers]
    badness = [_badness(layer) for layer in layers]

    def leaf(i: int, label: str) -> dict[str, Any]:
        layer = layers[i]
        return {
            "kind": "layer",
            "node": str(layer.get("name", "")),
            "label": label,
            "op": str(layer.get("op", "")),
            "ratio": "non-finite" if nonfinite[i] and ratios[i] is None else fmt_ratio(ratios[i]),
            "css": health_class(layer),
            "title": str(layer.get("health_note") or ""),
            "skip": i in skips,
            "skip_from": skips.get(i, ""),
        }

    def _summary(i: int | None) -> dict[str, str]:
        if i is None:
            return {"worst": fmt_ratio(None), "css": "none"}
        if nonfinite[i] and ratios[i] is None:
            return {"worst": "non-finite", "css": health_class(layers[i])}
        return {"worst": fmt_ratio(ratios[i]), "css": health_class(layers[i])}

    num_modules = 0

    def build(mod: _Module) -> tuple[list[dict[str, Any]], int, int | None]:
        """(children views, layer count, index of the worst layer) of one module."""
        nonlocal num_modules
        views: list[dict[str, Any]] = []
        count = 0
        worst: int | None = None

        def consider(i: int | None) -> None:
            nonlocal worst
            if i is not None and (worst is None or badness[i] > badness[worst]):
                worst = i

        for kind, item in mod.children:
            if kind == "layer":
                views.append(leaf(item, _short_label(str(layers[item].get("name", "")), mod)))
                count += 1
                consider(item)
                continue
            sub: _Module = item
            if not sub.subs and len(sub.children) == 1:
                (_, i), = sub.children
                views.append(leaf(i, sub.name))
                count += 1
                num_modules += 1  # a module of one layer is a module too (an nn.Sequential
                consider(i)       # of 20 of them read "20 layers in 0 modules")
                continue
            children, sub_count, sub_worst = build(sub)
            num_modules += 1
            views.append({
                "kind": "module",
                "name": sub.name,
                "path": sub.path,
                "depth": sub.depth,
                "open": sub.depth <= OPEN_DEPTH,
                "count": sub_count,
                **_summary(sub_worst),
                "children": children,
            })
            count += sub_count
            consider(sub_worst)
        return views, count, worst

    children, count, worst = build(root)
    return {
        "children": children,
        "count": count,
        **_summary(worst),
        "has_edges": has_edges,
        "num_skips": len(skips),
        "num_modules": num_modules,
        "judged": sum(1 for layer in layers if health_class(layer) != "none"),
        "legend": health_legend(doc.get("summary") or {}),
        "script": Markup(GRAPH_SCRIPT),  # a constant: no model string is in it
        "script_csp": GRAPH_SCRIPT_CSP,
    }


def health_legend(summary: Mapping[str, Any]) -> str:
    """What the colours mean, with the thresholds the analysis judged against."""
    keys = ("health_vanishing_error", "health_vanishing_warning", "health_exploding_warning",
            "health_exploding_error")
    values = [summary.get(k) for k in keys]
    if not all(isinstance(v, (int, float)) for v in values):
        return "Colour: the class the rules judged the worst layer below with."
    v_err, v_warn, e_warn, e_err = (f"{float(v):g}" for v in values)  # type: ignore[arg-type]
    return (f"Colour: the class the rules judged the worst layer below with, on the gradient "
            f"ratio to the output: ok {v_warn}\u2013{e_warn}, warn {v_err}\u2013{v_warn} or "
            f"{e_warn}\u2013{e_err}, bad beyond; grey: not judged (only the first trainable "
            "layer on each input path is).")


def render_graph(graph: dict[str, Any] | None) -> str:
    """The ``_graph.html.j2`` fragment alone, with the report's Jinja environment (for tests)."""
    return environment().get_template(TEMPLATE_NAME).render(v={"graph": graph})
