"""The module hierarchy of the HTML report: tree, colours, folding, escaping, size, skips."""

from __future__ import annotations

import base64
import hashlib
import re
from html.parser import HTMLParser
from typing import Any, ClassVar

import pytest

from gradscope.options import Thresholds
from gradscope.render.graph_view import (
    GRAPH_SCRIPT,
    GRAPH_SCRIPT_CSP,
    graph_view,
    health_class,
    render_graph,
)
from gradscope.rules.health import classify

XSS_IMG = "<img src=x onerror=alert(1)>"
XSS_SCRIPT = "</script><script>alert(1)</script>"


def _layer(name: str, module: str | None, op: str = "Linear", *, static: float | None = 1.0,
           probe: float | None = None, inputs: list[str] | None = None,
           judged: bool = True) -> dict[str, Any]:
    """A layer as the report writes it: the health figure is the probe's if any, else the
    estimate's, classed by the rules' own classifier (entry layers only: ``judged``)."""
    health = probe if probe is not None else static
    layer: dict[str, Any] = {
        "name": name, "module": module, "op": op, "depth": 0,
        "static_grad_rms": static, "probe_grad_rms": probe,
        "param_grad_ratio": None, "dead_fraction": None, "saturated_fraction": None,
        "health": health,
        "health_class": classify(health, Thresholds()) if judged else None,
    }
    if inputs is not None:
        layer["inputs"] = inputs
    return layer


def _doc(layers: list[dict[str, Any]]) -> dict[str, Any]:
    return {"layers": layers}


def _find(children: list[dict[str, Any]], name: str) -> dict[str, Any]:
    for child in children:
        if child.get("name", child.get("label")) == name:
            return child
    raise KeyError(name)


class _Tags(HTMLParser):
    """Start tags with attributes, script bodies, and a nesting check of non-void elements."""

    VOID: ClassVar[frozenset[str]] = frozenset({"br", "img", "input", "meta", "link", "hr"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:]}")
            return
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.scripts.append(data)


def _parse(html: str) -> _Tags:
    parser = _Tags()
    parser.feed(html)
    parser.close()
    assert parser.errors == [] and parser.stack == []
    return parser


def _transformer_doc(blocks: int) -> dict[str, Any]:
    """A Pre-LN encoder: per block 2 residual adds, 10 layers; plus input and head."""
    layers = [_layer("x", None, "input", inputs=[])]
    prev = "x"
    for b in range(blocks):
        p = f"encoder.layers.{b}"
        n = f"encoder_layers_{b}"
        attn = [
            _layer(f"{n}_norm1", f"{p}.norm1", "LayerNorm", inputs=[prev]),
            _layer(f"{n}_self_attn_q", f"{p}.self_attn.q_proj", inputs=[f"{n}_norm1"]),
            _layer(f"{n}_self_attn_sdpa", f"{p}.self_attn", "scaled_dot_product_attention",
                   inputs=[f"{n}_self_attn_q"]),
            _layer(f"{n}_self_attn_out", f"{p}.self_attn.out_proj",
                   inputs=[f"{n}_self_attn_sdpa"]),
            _layer(f"{n}_add", p, "add", inputs=[prev, f"{n}_self_attn_out"]),
        ]
        mlp = [
            _layer(f"{n}_norm2", f"{p}.norm2", "LayerNorm", inputs=[f"{n}_add"]),
            _layer(f"{n}_linear1", f"{p}.linear1", inputs=[f"{n}_norm2"]),
            _layer(f"{n}_gelu", f"{p}.activation", "GELU", inputs=[f"{n}_linear1"]),
            _layer(f"{n}_linear2", f"{p}.linear2", inputs=[f"{n}_gelu"]),
            _layer(f"{n}_add_1", p, "add", inputs=[f"{n}_add", f"{n}_linear2"]),
        ]
        layers += attn + mlp
        prev = f"{n}_add_1"
    layers.append(_layer("head", "head", inputs=[prev]))
    return _doc(layers)


# ------------------------------------------------------------------ hierarchy


def test_hierarchy_follows_module_paths_in_execution_order() -> None:
    doc = _doc([
        _layer("x", None, "input"),
        _layer("enc_0_lin", "encoder.layers.0.linear1"),
        _layer("enc_0_act", "encoder.layers.0.act", "ReLU"),
        _layer("enc_1_lin", "encoder.layers.1.linear1"),
        _layer("enc_1_act", "encoder.layers.1.act", "ReLU"),
        _layer("mul", None, "mul"),
        _layer("head", "head"),
        _layer("mean", None, "mean"),
    ])
    g = graph_view(doc)
    assert g is not None
    assert g["count"] == 8
    top = g["children"]
    # Layers without a module sit at the top level, in order, next to the top modules.
    assert [(c["kind"], c.get("name") or c["label"]) for c in top] == [
        ("layer", "x"), ("module", "encoder"), ("layer", "mul"), ("layer", "head"),
        ("layer", "mean"),
    ]
    encoder = _find(top, "encoder")
    assert (encoder["path"], encoder["depth"], encoder["count"]) == ("encoder", 1, 4)
    layers_ = _find(encoder["children"], "layers")
    assert (layers_["path"], layers_["depth"]) == ("encoder.layers", 2)
    block0 = _find(layers_["children"], "0")
    assert block0["path"] == "encoder.layers.0" and block0["count"] == 2
    # A module with one layer and no submodules is that layer, named by its segment.
    lin = _find(block0["children"], "linear1")
    assert lin["kind"] == "layer" and lin["node"] == "enc_0_lin" and lin["op"] == "Linear"
    # encoder, encoder.layers, .0, .1, and the modules of one layer: linear1 and act of
    # each block, head (a flat nn.Sequential of 20 layers is 20 modules, not 0)
    assert g["num_modules"] == 9


def test_module_called_twice_and_functional_layers_inside_a_module() -> None:
    doc = _doc([
        _layer("act", "block.act", "ReLU"),
        _layer("act_1", "block.act", "ReLU"),  # a reused module: one node, two layers
        _layer("add", "block", "add"),
    ])
    g = graph_view(doc)
    assert g is not None
    block = _find(g["children"], "block")
    act = _find(block["children"], "act")
    assert act["kind"] == "module" and act["count"] == 2
    assert [c["node"] for c in act["children"]] == ["act", "act_1"]
    assert _find(block["children"], "add")["kind"] == "layer"


def test_no_layers_gives_no_graph() -> None:
    assert graph_view({"layers": []}) is None
    assert graph_view({}) is None
    assert render_graph(None).strip() == ""


# -------------------------------------------------------------------- colours


@pytest.mark.parametrize(("ratio", "css"), [
    (1.0, "ok"), (0.01, "ok"), (100.0, "ok"),
    (0.00999, "warn"), (0.001, "warn"), (100.1, "warn"), (1000.0, "warn"),
    (0.000999, "bad"), (1000.1, "bad"), (0.0, "bad"),
    (float("inf"), "none"), (None, "none"),
])
def test_health_class_is_the_rules_class(ratio: float | None, css: str) -> None:
    """The colour is the class the rules judged with: the vanishing/exploding thresholds."""
    assert health_class(_layer("a", "m.a", static=ratio)) == css


def test_health_class_of_layers_not_judged_or_from_older_reports() -> None:
    assert health_class(_layer("a", "m.a", static=1e-9, judged=False)) == "none"
    assert health_class({"name": "a", "probe_grad_rms": 1e-9}) == "none"


def test_worst_ratio_in_the_subtree_decides_and_probe_wins_over_static() -> None:
    doc = _doc([
        _layer("a", "m.a", static=1.0),
        _layer("b", "m.b", static=500.0),            # warn
        _layer("c", "m.n.c", static=1e-5, probe=0.5),  # probe says ok
        _layer("d", "m.n.d", static=None),            # no figure
        _layer("e", "z.e", static=None),
        _layer("f", "z.f", static=None),
        _layer("g", "y.g", static=3e-4),               # bad
        _layer("h", "y.h", static=2.0),
        _layer("i", "w.i", static=0.0),                # bad: a dead gradient
        _layer("j", "w.j", static=1e-9),
    ])
    g = graph_view(doc)
    assert g is not None
    m = _find(g["children"], "m")
    assert (m["css"], m["worst"], m["count"]) == ("warn", "5.00e+02", 4)
    n = _find(m["children"], "n")
    assert (n["css"], n["worst"]) == ("ok", "5.00e-01")
    assert _find(n["children"], "d")["css"] == "none"
    assert _find(g["children"], "z")["css"] == "none"
    assert _find(g["children"], "y")["css"] == "bad"
    w = _find(g["children"], "w")
    assert (w["css"], w["worst"]) == ("bad", "0")  # zero is worse than any small number
    assert (g["css"], g["worst"]) == ("bad", "0")


def test_nonfinite_layer_is_bad() -> None:
    layer = _layer("a", "m.a", static=None)
    layer["nonfinite_backward"] = True
    layer["health_class"] = "bad"  # what gradscope.rules.health gives a non-finite layer
    g = graph_view(_doc([layer, _layer("b", "m.b")]))
    assert g is not None
    m = _find(g["children"], "m")
    assert (m["css"], m["worst"]) == ("bad", "non-finite")


def test_rendered_classes_carry_the_colour() -> None:
    html = render_graph(graph_view(_doc([_layer("a", "m.a", static=1e-4),
                                         _layer("b", "m.b", static=1.0)])))
    tags = _parse(html).tags
    (module,) = [a for t, a in tags if t == "details"]
    assert module["class"] == "module bad" and module["data-path"] == "m"
    leaves = {a["data-node"]: a["class"] for t, a in tags if t == "li" and "data-node" in a}
    assert leaves == {"a": "layer bad", "b": "layer ok"}


# -------------------------------------------------------------------- folding


def test_only_the_top_level_is_open() -> None:
    g = graph_view(_transformer_doc(3))
    html = render_graph(g)
    details = [a for t, a in _parse(html).tags if t == "details"]
    depth_of = {a["data-path"]: (a["data-path"] or "").count(".") + 1 for a in details}
    assert depth_of  # encoder, encoder.layers, blocks, self_attn
    for attrs in details:
        assert ("open" in attrs) == (depth_of[attrs["data-path"]] == 1), attrs
    assert [a["data-path"] for a in details if "open" in a] == ["encoder"]


def test_expand_and_collapse_buttons_and_csp_hash() -> None:
    html = render_graph(graph_view(_transformer_doc(1)))
    parser = _parse(html)
    ids = {a.get("id") for t, a in parser.tags if t == "button"}
    assert ids == {"graph-expand", "graph-collapse"}
    (script,) = parser.scripts
    assert script == GRAPH_SCRIPT and "details.module" in script
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"'sha256-{digest}'" == GRAPH_SCRIPT_CSP
    assert "innerHTML" not in html


# ------------------------------------------------------------------- escaping


def test_hostile_module_and_node_names_are_escaped() -> None:
    doc = _doc([
        _layer(XSS_IMG, f"enc.{XSS_IMG}.lin", op=XSS_SCRIPT, inputs=[]),
        _layer(XSS_SCRIPT, f"enc.{XSS_SCRIPT}", op="add", inputs=[XSS_IMG, "y"]),
        _layer("y", '" onmouseover="alert(1)', op="ReLU", inputs=[]),
    ])
    html = render_graph(graph_view(doc))
    for raw in (XSS_IMG, XSS_SCRIPT, "<script>alert", "<img", '" onmouseover'):
        assert raw not in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "&lt;/script&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in html
    parser = _parse(html)
    assert [t for t, _ in parser.tags].count("script") == 1
    assert [t for t, _ in parser.tags].count("img") == 0
    assert not any(k.startswith("on") for _, attrs in parser.tags for k in attrs)
    paths = {a["data-path"] for t, a in parser.tags if t == "details"}
    assert "enc" in paths and f"enc.{XSS_IMG}" in paths  # survives the round trip as text


def test_no_external_resources() -> None:
    html = render_graph(graph_view(_transformer_doc(2)))
    assert not re.search(r"""\b(?:src|href|action)\s*=|url\(|@import""", html, re.IGNORECASE)


# ----------------------------------------------------------------------- size


def test_size_per_layer_stays_small_for_a_3000_layer_model() -> None:
    doc = _transformer_doc(300)
    n = len(doc["layers"])
    assert n >= 3000
    html = render_graph(graph_view(doc))
    per_layer = len(html.encode()) / n
    assert per_layer < 300, per_layer
    assert len(html.encode()) * 2000 / n < 1_000_000  # a 2000-layer model: well under 2 MB
    assert html.count('class="layer ') == n


def test_size_with_long_paths_and_no_grouping() -> None:
    """A flat chain of 3000 distinct leaf modules in a deep namespace."""
    layers = [_layer(f"model_backbone_stage_{i // 100}_unit_{i}", f"model.backbone.stage{i // 100}."
                     f"unit{i}", static=1.0 / (i + 1)) for i in range(3000)]
    html = render_graph(graph_view(_doc(layers)))
    assert len(html.encode()) / 3000 < 300


# ---------------------------------------------------------------------- skips


def test_residual_adds_get_a_skip_badge_naming_the_source() -> None:
    g = graph_view(_transformer_doc(2))
    assert g is not None and g["has_edges"] and g["num_skips"] == 4
    html = render_graph(g)
    badges = [a for t, a in _parse(html).tags if t == "span" and a.get("class") == "skip"]
    assert [b["data-from"] for b in badges] == [
        "x", "encoder_layers_0_add", "encoder_layers_0_add_1", "encoder_layers_1_add"]
    assert "skip &larr; encoder_layers_0_add_1" in html


def test_adds_that_are_not_residual_get_no_badge() -> None:
    doc = _doc([
        _layer("x", None, "input", inputs=[]),
        _layer("lin", "lin", inputs=["x"]),
        _layer("add", None, "add", inputs=["lin", "bias"]),   # bias is a weight, not a layer
        _layer("add_1", None, "add", inputs=["add", "add"]),  # x + x: one input
        _layer("mul", None, "mul", inputs=["add_1", "x"]),    # not an add
        _layer("iadd", None, "iadd", inputs=["mul", "lin"]),  # x += y is an add
    ])
    g = graph_view(doc)
    assert g is not None
    skips = {c["node"]: c["skip_from"] for c in g["children"] if c["skip"]}
    assert skips == {"iadd": "lin"}


def test_without_edges_adds_across_module_parents_are_marked() -> None:
    doc = _doc([
        _layer("x", None, "input"),
        _layer("b0_lin", "blocks.0.lin"),
        _layer("b0_add", "blocks.0", "add"),  # previous layer ran in a submodule: residual
        _layer("b1_lin", "blocks.1.lin"),
        _layer("b1_add", "blocks.1.lin", "add"),  # same module as before: a plain add
    ])
    g = graph_view(doc)
    assert g is not None and not g["has_edges"]
    blocks = _find(g["children"], "blocks")
    b0 = _find(blocks["children"], "0")
    add = _find(b0["children"], "b0_add")
    assert add["skip"] and add["skip_from"] == ""
    html = render_graph(g)
    assert html.count('class="skip"') == 1
    assert 'data-from="">skip</span>' in html


def test_real_report_document_renders() -> None:
    torch = pytest.importorskip("torch")
    from torch import nn

    from gradscope.api import analyze

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear1 = nn.Linear(8, 8)
            self.act = nn.ReLU()

        def forward(self, x: Any) -> Any:
            return x + self.act(self.linear1(x))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.Sequential(Block(), Block())
            self.head = nn.Linear(8, 1)

        def forward(self, x: Any) -> Any:
            return self.head(self.enc(x)).mean()

    doc = analyze(Net(), torch.randn(4, 8)).to_dict()
    g = graph_view(doc)
    assert g is not None and g["count"] == len(doc["layers"]) and g["num_skips"] == 2
    enc = _find(g["children"], "enc")
    assert [c["path"] for c in enc["children"]] == ["enc.0", "enc.1"]
    _parse(render_graph(g))


def test_labels_drop_the_module_prefix_the_tree_already_shows() -> None:
    doc = _doc([
        _layer("enc_attn_softmax", "enc.attn", "softmax"),
        _layer("enc_attn_c_attn", "enc.attn.c_attn"),
        _layer("enc_attn_c_attn_1", "enc.attn.c_attn"),
        _layer("add", "enc.attn", "add"),
    ])
    g = graph_view(doc)
    assert g is not None
    attn = _find(_find(g["children"], "enc")["children"], "attn")
    labels = [(c["kind"], c.get("label") or c["name"]) for c in attn["children"]]
    assert labels == [("layer", "softmax"), ("module", "c_attn"), ("layer", "add")]
    c_attn = _find(attn["children"], "c_attn")
    assert [(c["label"], c["node"]) for c in c_attn["children"]] == [
        ("c_attn", "enc_attn_c_attn"), ("c_attn_1", "enc_attn_c_attn_1")]
