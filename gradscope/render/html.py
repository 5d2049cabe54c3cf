"""The HTML report (docs/contract.md section 5): one self-contained file for people.

It is opened from CI artifacts and ``file://`` URLs, often on machines with no
network, and it displays strings that come from arbitrary user code (module
names, file paths, exception messages). Hence: no external resources of any
kind, a Content-Security-Policy that forbids them anyway, Jinja's autoescaping
on every value, and ``StrictUndefined`` so a template typo fails the tests
instead of silently rendering an empty cell.

All arithmetic and formatting happens here in Python and the template only
lays it out, so the template stays readable and the numbers are testable.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from markupsafe import Markup

from gradscope._io import atomic_write_text
from gradscope.render.graph_view import graph_view
from gradscope.render.jinja import TEMPLATE_NAME, environment
from gradscope.rules.registry import RULES

_STATUS_LABELS = {"healthy": "Healthy", "warning": "Warnings", "unhealthy": "Unhealthy"}
_SEVERITY_ORDER = ("error", "warning", "info")
_SEVERITY_LABELS = {"error": "Errors", "warning": "Warnings", "info": "Info"}

# Depth-profile geometry, in SVG user units (the SVG scales to the page width).
_W, _H = 760.0, 280.0
_LEFT, _RIGHT, _TOP, _BOTTOM = 66.0, 16.0, 16.0, 40.0
# The update/weight chart is a shorter strip under the profile, same x axis.
_UH = 190.0
#: Above this many layers the charts draw points as one path each, without
#: per-point tooltips, so a 2,000-layer model's report stays small.
COMPACT_LAYERS = 400
#: The healthy band for one optimiser step's update relative to the weight.
UPDATE_BAND = (1e-4, 1e-2)

#: Replaced after rendering by the hashes of the page's own inline scripts, so
#: the CSP allows exactly those scripts and nothing injected.
_CSP_SCRIPT_SENTINEL = "script-src-gradscope-placeholder"
_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)


# ---------------------------------------------------------------- formatting


def fmt_num(value: Any) -> str:
    """``1.23e-04`` for floats (gradients span many decades), plain digits for ints."""
    if value is None:
        return "\u2013"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value == 0.0:
            return "0"
        return f"{value:.2e}"
    return str(value)


def fmt_pct(value: Any) -> str:
    """Shares (dead, saturated, coverage) read better as percentages."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return f"{value * 100:.1f}%"
    return fmt_num(value)


def fmt_any(value: Any) -> str:
    """A readable one-line rendering of free-form values (inputs, evidence, summary)."""
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={fmt_any(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(fmt_any(v) for v in value) + "]"
    return fmt_num(value)


def fmt_count(value: Any) -> str:
    """Parameter counts with thousands separators: 11,689,512 is easier than 11689512."""
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return fmt_num(value)


def fmt_shape(shape: Any) -> str:
    if isinstance(shape, (list, tuple)):
        return "\u00d7".join(str(s) for s in shape) if shape else "scalar"
    return "\u2013"


def fmt_location(file: Any, line: Any) -> str:
    if not file:
        return ""
    return f"{file}:{line}" if line else str(file)


def script_json(doc: Any) -> Markup:
    """JSON that can sit inside ``<script type="application/json">`` without ending it.

    Script content is raw text to the HTML parser, so entity escaping does not
    work there; escaping ``<``, ``>`` and ``&`` as JSON unicode escapes does,
    and ``JSON.parse`` restores them. U+2028/9 are escaped for old JS parsers.
    This is the one place that produces Markup from data, and only after that
    escaping.
    """
    text = json.dumps(doc, ensure_ascii=True, allow_nan=False, sort_keys=False,
                      separators=(",", ":"))
    for raw, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        text = text.replace(raw, esc)
    text = text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    return Markup(text)


# ------------------------------------------------------------------- views


def _positive_log10(value: Any) -> float | None:
    if _is_real(value) and math.isfinite(value) and value > 0:
        return math.log10(value)
    return None


def _is_real(value: Any) -> bool:
    """int or float but not bool (which JSON keeps distinct and Python does not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _decade_label(k: int) -> str:
    return "1" if k == 0 else f"1e{k}"


def _spread(layer: Mapping[str, Any]) -> tuple[float | None, float | None]:
    """The measured health's min and max across probe batches.

    The probe keeps the per-batch spread of the gradient RMS; the health figure is
    the same gradient's norm ratio, so the spread scales by the same factors.
    """
    figures: list[float] = []
    for key in ("health_measured", "probe_grad_rms", "probe_grad_rms_min", "probe_grad_rms_max"):
        value = layer.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) \
                or not math.isfinite(value):
            return None, None
        figures.append(float(value))
    measured, rms, lo, hi = figures
    if not rms > 0:
        return None, None
    return (_positive_log10(measured * lo / rms), _positive_log10(measured * hi / rms))


def depth_profile(layers: Sequence[Mapping[str, Any]],
                  summary: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Coordinates for the inline SVG of log10 gradient health against layer index.

    The figure is each layer's gradient health, the ratio the rules judge
    (``health_predicted`` from the static estimate, ``health_measured`` from the
    probe); the band between the vanishing and exploding warning thresholds is
    shaded, and the judged layers are ringed in their class's colour. Gaps (null,
    zero or negative values, which have no logarithm) break the static line
    instead of being bridged, so a missing estimate never looks like a measured
    trend.
    """
    summary = summary or {}
    n = len(layers)
    static = [_positive_log10(layer.get("health_predicted")) for layer in layers]
    probe = [_positive_log10(layer.get("health_measured")) for layer in layers]
    spread = [_spread(layer) for layer in layers]
    spread_ends = [v for pair in spread for v in pair if v is not None]
    band = (_positive_log10(summary.get("health_vanishing_warning")),
            _positive_log10(summary.get("health_exploding_warning")))
    values = [v for v in static + probe + spread_ends if v is not None]
    if values:
        values += [v for v in band if v is not None]
    skipped = sum(
        1
        for layer in layers
        for key in ("health_predicted", "health_measured")
        if layer.get(key) is not None and _positive_log10(layer.get(key)) is None
    )
    base: dict[str, Any] = {
        "width": int(_W),
        "height": int(_H),
        "has_data": bool(values),
        "skipped": skipped,
        "has_static": any(v is not None for v in static),
        "has_probe": any(v is not None for v in probe),
        "has_spread": False,
        "compact": n > COMPACT_LAYERS,
        "update_chart": update_profile(layers),
        "band_top": None,
        "band_height": None,
        "band_label": None,
        "judged_points": [],
    }
    if not values:
        return base

    lo = math.floor(min(values))
    hi = math.ceil(max(values))
    if lo == hi:
        lo, hi = lo - 1, hi + 1
    plot_w = _W - _LEFT - _RIGHT
    plot_h = _H - _TOP - _BOTTOM

    def x_of(i: int) -> float:
        return _LEFT + (plot_w * i / (n - 1) if n > 1 else plot_w / 2)

    def y_of(v: float) -> float:
        return _TOP + plot_h * (hi - v) / (hi - lo)

    def r(v: float) -> str:
        return f"{v:.1f}"

    segments: list[str] = []
    current: list[str] = []
    static_points: list[dict[str, str]] = []
    for i, v in enumerate(static):
        if v is None:
            if current:
                segments.append(" ".join(current))
            current = []
            continue
        x, y = r(x_of(i)), r(y_of(v))
        current.append(("M" if not current else "L") + f"{x},{y}")
        value = fmt_num(layers[i].get("health_predicted"))
        title = f"{i}: {layers[i].get('name')} predicted {value}"
        static_points.append({"x": x, "y": y, "title": title})
    if current:
        segments.append(" ".join(current))

    probe_points = [
        {
            "x": r(x_of(i)),
            "y": r(y_of(v)),
            "title": f"{i}: {layers[i].get('name')} measured "
            + fmt_num(layers[i].get("health_measured")),
        }
        for i, v in enumerate(probe)
        if v is not None
    ]

    spread_bars = []
    for i, (smin, smax) in enumerate(spread):
        if smin is None or smax is None or smax - smin < 1e-9:
            continue
        spread_bars.append(
            {
                "x": r(x_of(i)),
                "y1": r(y_of(smin)),
                "y2": r(y_of(smax)),
                "title": f"{i}: {layers[i].get('name')} across batches "
                + fmt_num(10.0 ** smin)
                + " \u2013 "
                + fmt_num(10.0 ** smax),
            }
        )

    judged_points = []
    for i, layer in enumerate(layers):
        css = str(layer.get("health_class") or "")
        v = _positive_log10(layer.get("health"))
        if css not in ("ok", "warn", "bad") or v is None:
            continue
        judged_points.append({
            "x": r(x_of(i)), "y": r(y_of(v)), "css": css,
            "title": f"{i}: {layers[i].get('name')} judged {css}: "
            + fmt_num(layer.get("health")) + f" ({layer.get('health_source')})"})
    if band[0] is not None and band[1] is not None:
        base["band_top"] = r(y_of(band[1]))
        base["band_height"] = r(y_of(band[0]) - y_of(band[1]))
        base["band_label"] = (f"healthy band {fmt_num(summary.get('health_vanishing_warning'))}"
                              f" \u2013 {fmt_num(summary.get('health_exploding_warning'))}")
    step = max(1, math.ceil((hi - lo) / 8))
    yticks = [
        {"y": r(y_of(k)), "label": _decade_label(k)}
        for k in range(lo, hi + 1)
        if (k - lo) % step == 0
    ]
    xstep = max(1, math.ceil(n / 10))
    xticks = [{"x": r(x_of(i)), "label": str(i)} for i in range(0, n, xstep)]
    half = (plot_w / (n - 1) if n > 1 else plot_w) / 2
    spans = []
    for k, (a, b, label) in enumerate(module_spans(layers)):
        x0, x1 = max(x_of(a) - half, _LEFT), min(x_of(b) + half, _W - _RIGHT)
        # a label only where it fits (5 px a character at 9 px): every span keeps its title
        spans.append({"x": r(x0), "w": r(x1 - x0), "label": label, "lx": r(x0 + 3),
                      "shown": (x1 - x0) >= 5.0 * len(label) + 6, "shade": k % 2 == 1})
    if base["compact"]:
        # One path per series: a zero-length segment with a round cap is a dot.
        base["probe_dots"] = "".join(f"M{p['x']},{p['y']}h0" for p in probe_points)
        base["spread_path"] = "".join(f"M{b['x']},{b['y1']}V{b['y2']}" for b in spread_bars)
        base["has_spread"] = bool(spread_bars)
        static_points, probe_points, spread_bars = [], [], []
    base.update(
        {
            "static_path": " ".join(segments),
            "static_points": static_points,
            "probe_points": probe_points,
            "spread_bars": spread_bars,
            "judged_points": judged_points,
            "plot_w": r(plot_w),
            "has_spread": base["has_spread"] or bool(spread_bars),
            "yticks": yticks,
            "xticks": xticks,
            "spans": spans,
            "plot_h": r(plot_h),
            "unity_y": r(y_of(0.0)) if lo <= 0 <= hi else None,
            "left": r(_LEFT),
            "right": r(_W - _RIGHT),
            "top": r(_TOP),
            "bottom": r(_H - _BOTTOM),
            "xmid": r(_LEFT + plot_w / 2),
            "xlabel_y": r(_H - 6),
            "ylabel_x": r(14),
            "ylabel_y": r(_TOP + plot_h / 2),
        }
    )
    return base


#: Most module spans the depth profile marks (beyond, a coarser nesting level is used).
MAX_SPANS = 24


def module_spans(layers: Sequence[Mapping[str, Any]]) -> list[tuple[int, int, str]]:
    """(first, last, label) runs of consecutive layers in one module, for the depth profile.

    The profile is indexed by node; these spans say which module each stretch belongs to
    (GPT-2: wte, h.0 ... h.3, ln_f, lm_head). Top-level modules first; then, while a
    span holds more than a quarter of the layers and splitting it keeps at most
    :data:`MAX_SPANS`, it is replaced by its submodules' runs. An op a module runs itself
    (between its submodules) does not break a run. Labels are at most the path's last two
    parts (``transformer.h.3`` -> ``h.3``). Empty when there are fewer than two spans.
    """
    paths = [str(layer.get("module") or "") for layer in layers]

    def runs(first: int, last: int, level: int, prefix: str) -> list[tuple[int, int, str]]:
        out: list[tuple[int, int, str]] = []
        for i in range(first, last + 1):
            path = paths[i]
            if not path or (prefix and not path.startswith(prefix + ".")) \
                    or path.count(".") + 1 < level:
                continue  # outside, or an op of the enclosing module: it breaks nothing
            key = ".".join(path.split(".")[:level])
            if out and out[-1][2] == key:
                out[-1] = (out[-1][0], i, key)
            else:
                out.append((i, i, key))
        return out

    spans = runs(0, len(paths) - 1, 1, "")
    changed = True
    while changed:
        changed = False
        biggest = max(spans, key=lambda run: run[1] - run[0], default=None)
        if biggest is None or biggest[1] - biggest[0] + 1 <= len(paths) / 4:
            break
        a, b, key = biggest
        sub = runs(a, b, key.count(".") + 2, key)
        while len(sub) == 1 and sub[0][2] != key:  # one child (encoder.layers): go through
            key = sub[0][2]
            sub = runs(a, b, key.count(".") + 2, key)
        if len(sub) >= 2 and len(spans) - 1 + len(sub) <= MAX_SPANS:
            k = spans.index(biggest)
            spans[k:k + 1] = sub
            changed = True
    if len(spans) < 2:
        return []
    return [(a, b, ".".join(label.split(".")[-2:])) for a, b, label in spans]


def update_profile(layers: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Coordinates for the strip chart of log10(update / weight) per layer, or None.

    Shares the depth profile's x axis (layer index) so the two line up; the
    healthy band of :data:`UPDATE_BAND` is shaded and points outside it are
    drawn in the warning colour.
    """
    n = len(layers)
    logs = [_positive_log10(layer.get("update_ratio")) for layer in layers]
    values = [v for v in logs if v is not None]
    if not values:
        return None
    band_lo, band_hi = (math.log10(b) for b in UPDATE_BAND)
    lo = min(math.floor(min(values)), math.floor(band_lo) - 1)
    hi = max(math.ceil(max(values)), math.ceil(band_hi) + 1)
    plot_w = _W - _LEFT - _RIGHT
    plot_h = _UH - _TOP - _BOTTOM

    def x_of(i: int) -> float:
        return _LEFT + (plot_w * i / (n - 1) if n > 1 else plot_w / 2)

    def y_of(v: float) -> float:
        return _TOP + plot_h * (hi - v) / (hi - lo)

    def r(v: float) -> str:
        return f"{v:.1f}"

    points = []
    outside = 0
    for i, v in enumerate(logs):
        if v is None:
            continue
        ok = band_lo <= v <= band_hi
        outside += not ok
        points.append(
            {
                "x": r(x_of(i)),
                "y": r(y_of(v)),
                "css": "update-point" if ok else "update-point off",
                "title": f"{i}: {layers[i].get('name')} update/weight "
                + fmt_num(layers[i].get("update_ratio")),
            }
        )
    compact = n > COMPACT_LAYERS
    dots = {
        css: "".join(f"M{p['x']},{p['y']}h0" for p in points if p["css"] == css)
        for css in ("update-point", "update-point off")
    } if compact else {}
    step = max(1, math.ceil((hi - lo) / 6))
    xstep = max(1, math.ceil(n / 10))
    return {
        "compact": compact,
        "dots_in": dots.get("update-point", ""),
        "dots_off": dots.get("update-point off", ""),
        "width": int(_W),
        "height": int(_UH),
        "points": [] if compact else points,
        "count": len(points),
        "outside": outside,
        "band_top": r(y_of(band_hi)),
        "band_height": r(y_of(band_lo) - y_of(band_hi)),
        "band_label": f"healthy band {fmt_num(UPDATE_BAND[0])} \u2013 {fmt_num(UPDATE_BAND[1])}",
        "yticks": [
            {"y": r(y_of(k)), "label": _decade_label(k)}
            for k in range(lo, hi + 1)
            if (k - lo) % step == 0
        ],
        "xticks": [{"x": r(x_of(i)), "label": str(i)} for i in range(0, n, xstep)],
        "left": r(_LEFT),
        "right": r(_W - _RIGHT),
        "top": r(_TOP),
        "bottom": r(_UH - _BOTTOM),
        "plot_w": r(plot_w),
        "xmid": r(_LEFT + plot_w / 2),
        "xlabel_y": r(_UH - 6),
        "ylabel_x": r(14),
        "ylabel_y": r(_TOP + plot_h / 2),
    }


#: Most bars the weight-gradient chart draws (3.4 px each): a larger model's neighbouring
#: layers share a bar, and a 1,200-layer page stays under 2 MB.
_MAX_BARS = 200
#: Height of the weight-gradient chart (room under the plot for the module labels).
_GH = 300.0
_GBOTTOM = 110.0


def weight_grad_chart(layers: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Bars of ||grad W|| per weight layer in network order, labelled by module, with
    ||grad W||/||W|| as points on the same log axis; None without measured weights.

    The chart everybody draws (``plot_grad_flow``, ``wandb.watch``): the measured
    gradient of each layer's weights, first layer on the left. Bars and points are one
    path each above :data:`COMPACT_LAYERS` layers, so a large model's page stays small.
    """
    weighted = [(i, layer) for i, layer in enumerate(layers)
                if _positive_log10(layer.get("param_grad_norm")) is not None]
    if not weighted:
        return None
    total = len(weighted)
    per = max(1, math.ceil(total / _MAX_BARS))  # layers per bar on a large model
    if per > 1:
        # 0.3 px per layer on a 1,200-layer model: each bar is the largest of ``per``
        # neighbouring layers (and so is each point), labelled by the first of them.
        weighted = [max(weighted[k:k + per],
                        key=lambda item: _positive_log10(item[1].get("param_grad_norm")) or 0.0)
                    for k in range(0, total, per)]
    norms = [_positive_log10(layer.get("param_grad_norm")) or 0.0 for _, layer in weighted]
    ratios = [_positive_log10(layer.get("param_grad_ratio")) for _, layer in weighted]
    values = norms + [v for v in ratios if v is not None]
    lo, hi = math.floor(min(values)) - 1, math.ceil(max(values))
    if hi <= lo:
        hi = lo + 1
    n = len(weighted)
    plot_w = _W - _LEFT - _RIGHT
    plot_h = _GH - _TOP - _GBOTTOM
    slot = plot_w / n
    bar = max(min(slot * 0.7, 18.0), 0.6)

    def x_of(k: int) -> float:
        return _LEFT + slot * (k + 0.5)

    def y_of(v: float) -> float:
        return _TOP + plot_h * (hi - v) / (hi - lo)

    def r(v: float) -> str:
        return f"{v:.1f}"

    bottom = _GH - _GBOTTOM
    compact = total > COMPACT_LAYERS
    bars = [{"x": r(x_of(k)), "y": r(y_of(v)),
             "title": f"{layer.get('module') or layer.get('name')}: ||grad W|| "
                      f"{fmt_num(layer.get('param_grad_norm'))}, ||grad W||/||W|| "
                      f"{fmt_num(layer.get('param_grad_ratio'))}"}
            for k, ((_, layer), v) in enumerate(zip(weighted, norms, strict=True))]
    dots = "".join(f"M{r(x_of(k))},{r(y_of(v))}h0" for k, v in enumerate(ratios)
                   if v is not None)
    every = max(1, math.ceil(n / 30))
    labels = [{"x": r(x_of(k)), "label": str(layer.get("module") or layer.get("name"))}
              for k, (_, layer) in enumerate(weighted) if k % every == 0]
    step = max(1, math.ceil((hi - lo) / 6))
    return {
        "compact": compact,
        "bars": [] if compact else bars,
        "bars_path": "".join(f"M{b['x']},{r(bottom)}V{b['y']}" for b in bars) if compact else "",
        "bar_width": r(bar),
        "dots": dots,
        "count": total,
        "per_bar": per,
        "width": int(_W),
        "height": int(_GH),
        "yticks": [{"y": r(y_of(k)), "label": _decade_label(k)}
                   for k in range(lo, hi + 1) if (k - lo) % step == 0],
        "labels": labels,
        "label_y": r(bottom + 8),
        "left": r(_LEFT),
        "right": r(_W - _RIGHT),
        "top": r(_TOP),
        "bottom": r(bottom),
        "ylabel_x": r(14),
        "ylabel_y": r(_TOP + plot_h / 2),
    }


_TH = 200.0


def _line_chart(values: Sequence[Any], log: bool, bounds: tuple[int, int] | None = None,
                min_points: int = 2) -> dict[str, Any] | None:
    """One series over 0..len-1 as an SVG line in the charts' frame: on decades (``log``;
    ``bounds`` fixes them) or on a linear axis spanning the values. None with fewer than
    ``min_points`` plottable values."""
    points = [(i, float(v)) for i, v in enumerate(values) if _is_real(v)
              and (not log or float(v) > 0)]
    if len(points) < min_points:
        return None
    ys = [math.log10(v) if log else v for _, v in points]
    lo: float
    hi: float
    if bounds is not None:
        lo, hi = bounds
    elif log:
        lo, hi = math.floor(min(ys)), max(math.ceil(max(ys)), math.floor(min(ys)) + 1)
    else:
        lo, hi = min(ys), max(ys)
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5, hi + 0.5
    n = max(len(values) - 1, 1)
    plot_w, plot_h = _W - _LEFT - _RIGHT, _TH - _TOP - _BOTTOM

    def x_of(t: float) -> float:
        return _LEFT + plot_w * t / n

    def y_of(v: float) -> float:
        return _TOP + plot_h * (hi - v) / (hi - lo)

    if log:
        step = max(1, math.ceil((hi - lo) / 6))
        yticks = [{"y": f"{y_of(k):.1f}", "label": _decade_label(k)}
                  for k in range(int(lo), int(hi) + 1) if (k - int(lo)) % step == 0]
    else:
        yticks = [{"y": f"{y_of(lo + (hi - lo) * k / 4):.1f}",
                   "label": fmt_num(lo + (hi - lo) * k / 4)} for k in range(5)]
    return {"width": int(_W), "height": int(_TH),
            "path": "M" + "L".join(f"{x_of(i):.1f},{y_of(y):.1f}"
                                   for (i, _), y in zip(points, ys, strict=True)),
            "yticks": yticks,
            "xticks": [{"x": f"{x_of(t):.1f}", "label": str(t)}
                       for t in range(0, n + 1, max(1, math.ceil((n + 1) / 10)))],
            "left": f"{_LEFT:.1f}", "right": f"{_W - _RIGHT:.1f}",
            "top": f"{_TOP:.1f}", "bottom": f"{_TH - _BOTTOM:.1f}",
            "xmid": f"{_LEFT + plot_w / 2:.1f}", "xlabel_y": f"{_TH - 6:.1f}",
            "ylabel_x": "14", "ylabel_y": f"{_TOP + plot_h / 2:.1f}"}


def time_charts(layers: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """For each recurrent layer, its predicted input gradient per time step (relative to
    the largest step's, log scale): how far back in the sequence the gradient reaches."""
    charts = []
    for layer in layers:
        profile = layer.get("time_profile")
        if not isinstance(profile, list) or len(profile) < 2:
            continue
        known = [v for v in (_positive_log10(v) for v in profile) if v is not None]
        if not known:
            continue
        chart = _line_chart(profile, True, bounds=(min(math.floor(min(known)), -3), 0),
                            min_points=1)
        if chart is None:
            continue
        chart.update(name=str(layer.get("module") or layer.get("name")),
                     op=str(layer.get("op", "")), steps=len(profile),
                     first=fmt_num(profile[0]))
        charts.append(chart)
    return charts


def _step_chart(values: Sequence[Any], log: bool, label: str) -> dict[str, Any] | None:
    """One per-step series of a watched run (its loss, its gradient norm)."""
    chart = _line_chart(values, log)
    if chart is not None:
        chart["label"] = label
    return chart


#: The per-module figures of a watched run's table: (field, column title, as percent).
_STEP_FIELDS = (("grad_rms", "Gradient health", False), ("update_ratio", "Update / weight", False),
                ("dead_fraction", "Dead units", True),
                ("saturated_fraction", "Saturated outputs", True))


def steps_view(steps: Any) -> dict[str, Any] | None:
    """A watched run (``gradscope.watch``): loss and gradient norm per step, and each
    module's figures at the recorded steps (one table per figure, steps as columns)."""
    if not isinstance(steps, Mapping):
        return None
    recorded = [r for r in steps.get("recorded") or [] if isinstance(r, Mapping)]
    columns = [str(r.get("step")) for r in recorded]
    tables = []
    for field, title, pct in _STEP_FIELDS:
        rows = []
        for name, cls in (steps.get("modules") or {}).items():
            cells = [((r.get("layers") or {}).get(name) or {}).get(field) for r in recorded]
            if any(c is not None for c in cells):
                rows.append({"name": str(name), "cls": str(cls),
                             "cells": [fmt_pct(c) if pct else fmt_num(c) for c in cells]})
        if rows:
            tables.append({"title": title, "rows": rows})
    first = steps.get("first_nonfinite_step")
    return {"steps": steps.get("steps"), "every": steps.get("every"),
            "horizon": steps.get("horizon"), "optimizer": str(steps.get("optimizer") or ""),
            "lr": fmt_num(steps.get("lr")), "first_nonfinite": first,
            "loss": _step_chart(steps.get("losses") or [], False, "loss"),
            "grad_norm": _step_chart(steps.get("grad_norms") or [], True, "gradient norm"),
            "columns": columns, "tables": tables}


def _verified_text(verified: Any, label: str = "verified") -> str:
    """``verified: 2.00e-08 \u2192 4.10e-01 (metric)``, or '' without figures; ``label``
    ``measured`` for a change trained on a copy (``Recommendation.measured``)."""
    if not isinstance(verified, Mapping):
        return ""
    metric = str(verified.get("metric") or "").strip()
    text = f"{label}: {fmt_num(verified.get('before'))} \u2192 {fmt_num(verified.get('after'))}"
    return f"{text} ({metric})" if metric else text


def _finding_view(f: Mapping[str, Any]) -> dict[str, Any]:
    loc: Mapping[str, Any] = f.get("location") or {}
    code = str(f.get("rule", ""))
    rule = RULES.get(code)
    return {
        "rule": code,
        "rule_name": rule.name if rule else "",
        "rule_summary": rule.summary if rule else "",
        "rule_why": rule.why if rule else "",
        "rule_references": list(rule.references) if rule else [],
        "category": str(f.get("category", "")),
        "severity": str(f.get("severity", "")),
        "message": str(f.get("message", "")),
        "file_line": fmt_location(loc.get("file"), loc.get("line")),
        "module": loc.get("module") or "",
        "node": loc.get("node") or "",
        "evidence": [(str(k), fmt_any(v)) for k, v in (f.get("evidence") or {}).items()],
        "recommendations": [
            {"kind": str(rec.get("kind", "")), "text": str(rec.get("text", "")),
             "code": str(rec.get("code") or ""), "code_id": "",
             "verified": _verified_text(rec.get("verified")),
             "measured": _verified_text(rec.get("measured"), "measured")}
            for rec in f.get("recommendations") or []
        ],
    }


def _finding_groups(findings: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    by_sev: dict[str, list[dict[str, Any]]] = {}
    for f in findings:
        view = _finding_view(f)
        by_sev.setdefault(view["severity"], []).append(view)
    order = list(_SEVERITY_ORDER) + sorted(s for s in by_sev if s not in _SEVERITY_ORDER)
    # Ids for the copy buttons, numbered in display order so they are stable. A fix
    # that several findings share (GS101 and GS102 on one cause) shows its code once;
    # later findings link to it (``same_as``) instead of repeating a screenful.
    serial = 0
    shown: dict[str, tuple[str, str]] = {}
    for sev in order:
        for view in by_sev.get(sev, []):
            for rec in view["recommendations"]:
                rec["same_as"] = None
                if not rec["code"]:
                    continue
                if rec["code"] in shown:
                    rec["same_as"] = shown[rec["code"]]
                    continue
                serial += 1
                rec["code_id"] = f"fix-{serial}"
                shown[rec["code"]] = (rec["code_id"], view["rule"])
    return [
        {
            "severity": sev,
            "css": sev if sev in _SEVERITY_ORDER else "info",
            "label": _SEVERITY_LABELS.get(sev, sev),
            "findings": by_sev[sev],
        }
        for sev in order
        if by_sev.get(sev)
    ]


def _sort_value(value: Any) -> str | None:
    """A compact number for a ``data-*`` sort attribute; None (attribute left out) sorts last."""
    if not _is_real(value) or not math.isfinite(value):
        return None
    if isinstance(value, int):
        return str(value)
    return format(value, ".4g")


def _numel(shape: Any) -> int | None:
    if not isinstance(shape, (list, tuple)) or not all(_is_real(d) for d in shape):
        return None
    return math.prod(int(d) for d in shape)


#: Numeric sort keys of the layer table: ``data-KEY`` on each row, from these layer fields.
SORT_FIELDS = (
    ("i", None), ("depth", "depth"), ("numel", None), ("health", "health"),
    ("static", "health_predicted"), ("probe", "health_measured"), ("ratio", "param_grad_ratio"),
    ("update", "update_ratio"),
    ("dead", "dead_fraction"), ("saturated", "saturated_fraction"), ("params", "num_params"),
)


def short_files(layers: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """Layer source files by a short name: the base name wherever that is unambiguous.

    A Hugging Face model repeats an 80-character site-packages path on every
    row; the table shows ``modeling_gpt2.py:213`` and lists each full path once.
    """
    files = sorted({str(layer["file"]) for layer in layers if layer.get("file")})
    bases: dict[str, list[str]] = {}
    for f in files:
        bases.setdefault(f.replace("\\", "/").rsplit("/", 1)[-1], []).append(f)
    return {
        f: base if len(paths) == 1 else f for base, paths in bases.items() for f in paths
    }


def _layer_rows(
    layers: Sequence[Mapping[str, Any]], findings: Sequence[Mapping[str, Any]],
    files: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    files = files if files is not None else short_files(layers)
    flagged_nodes = {(f.get("location") or {}).get("node") for f in findings} - {None}
    flagged_modules = {(f.get("location") or {}).get("module") for f in findings} - {None}
    rows = []
    for i, layer in enumerate(layers):
        classes = []
        if layer.get("name") in flagged_nodes or (
            layer.get("module") is not None and layer.get("module") in flagged_modules
        ):
            classes.append("flagged")
        if layer.get("nonfinite_forward") or layer.get("nonfinite_backward"):
            classes.append("nonfinite")
        data = []
        for key, field in SORT_FIELDS:
            raw = i if key == "i" else _numel(layer.get("shape")) if key == "numel" else (
                layer.get(field) if field else None)
            value = _sort_value(raw)
            if value is not None:
                data.append((key, value))
        rows.append(
            {
                "index": i,
                "name": str(layer.get("name", "")),
                "module": layer.get("module") or "",
                "op": str(layer.get("op", "")),
                "understood": layer.get("understood", True) is not False,
                "depth": fmt_num(layer.get("depth")),
                "shape": fmt_shape(layer.get("shape")),
                "health": fmt_num(layer.get("health")),
                "health_css": {"ok": "ok", "warn": "warn", "bad": "bad"}.get(
                    str(layer.get("health_class")), "none"),
                "health_note": str(layer.get("health_note") or ""),
                "static": fmt_num(layer.get("health_predicted")),
                "probe": fmt_num(layer.get("health_measured")),
                "ratio": fmt_num(layer.get("param_grad_ratio")),
                "upd": fmt_num(layer.get("update_ratio")),
                "data": data,
                "dead": fmt_pct(layer.get("dead_fraction")),
                "saturated": fmt_pct(layer.get("saturated_fraction")),
                "params": fmt_count(layer.get("num_params", 0)),
                "location": fmt_location(
                    files.get(str(layer.get("file")), layer.get("file")), layer.get("line")
                ),
                "css": " ".join(classes),
            }
        )
    return rows


#: The pseudo-module of ops the model's own forward calls outside any submodule.
TOP_LEVEL = "(model)"


def _module_of(layer: Mapping[str, Any]) -> str:
    return str(layer.get("module") or "") or TOP_LEVEL


def _ancestors(path: str) -> list[str]:
    """``a.b.c`` -> ``a``, ``a.b``, ``a.b.c`` (the pseudo-module has none)."""
    if path == TOP_LEVEL:
        return [path]
    parts = path.split(".")
    return [".".join(parts[:k]) for k in range(1, len(parts) + 1)]


def _norm_of(values: Iterable[Any]) -> float | None:
    """sqrt(sum of squares) of the known figures: ||grad W|| over several weights."""
    known = [float(v) for v in values if _is_real(v)]
    return math.sqrt(sum(v * v for v in known)) if known else None


def _one(values: list[Any]) -> Any:
    """The figure of the module's one weighted layer; None (no single figure) otherwise."""
    known = [v for v in values if _is_real(v)]
    return known[0] if len(known) == 1 else None


def _ranges(indices: Sequence[int]) -> str:
    """``3,4,5,9`` as ``3-5,9``: a module's ops mostly run one after another, and a
    1,200-layer model's page must stay under 2 MB with its JSON embedded."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def module_rows(layers: Sequence[Mapping[str, Any]], findings: Sequence[Mapping[str, Any]],
                files: Mapping[str, str] | None = None,
                classes_by_path: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """The report's main table: one row per nn.Module, the hierarchy in execution order,
    with the graph's op-level nodes folded under the module that runs them.

    torchinfo's per-module table is what users read: on GPT-2 the node table's first 30
    rows were ``view``, ``arange`` and ``unsqueeze`` (issue 16). A module's figures are
    its output's (the last node it runs): gradient health predicted and measured; its
    weights' ||grad W|| (over all of them) and, when it holds one weighted layer, that
    layer's ||grad W||/||W|| and update ratio; the largest dead and saturated shares of
    its activations; its parameters (what its nodes use); the first source line. Ops
    the model's own forward runs outside any submodule are under ``(model)``. ``ops``
    are indices into ``layers`` (the node table's ``data-i``).
    """
    files = files if files is not None else short_files(layers)
    flagged_nodes = {(f.get("location") or {}).get("node") for f in findings} - {None}
    flagged_modules = {(f.get("location") or {}).get("module") for f in findings} - {None}
    order: list[str] = []
    subtree: dict[str, list[int]] = {}
    own: dict[str, list[int]] = {}
    for i, layer in enumerate(layers):
        if layer.get("op") in ("input", "parameter"):
            continue
        path = _module_of(layer)
        own.setdefault(path, []).append(i)
        for ancestor in _ancestors(path):
            if ancestor not in subtree:
                subtree[ancestor] = []
                order.append(ancestor)
            subtree[ancestor].append(i)
    rows: list[dict[str, Any]] = []
    for path in order:
        members = [layers[i] for i in subtree[path]]
        out = members[-1]
        classes = [str(layer.get("module_class")) for layer in members
                   if layer.get("module") == path and layer.get("module_class")]
        if not classes and classes_by_path and path in classes_by_path:
            classes = [str(classes_by_path[path])]
        weighted = [layer for layer in members if _is_real(layer.get("param_grad_ratio"))]
        located = next((layer for layer in members if layer.get("file")), None)
        children = own.get(path, [])
        if len(children) == 1 and layers[children[0]].get("module_class") \
                and layers[children[0]].get("module") == path:
            children = []  # a module kept whole: its one node is the row itself
        flagged = path in flagged_modules or any(
            layer.get("name") in flagged_nodes or layer.get("module") in flagged_modules
            for layer in members)
        depth = 0 if path == TOP_LEVEL else path.count(".")
        def num(value: Any) -> str:  # a module row leaves unknown figures blank
            return fmt_num(value) if _is_real(value) else ""

        def pct(value: Any) -> str:
            return fmt_pct(value) if _is_real(value) else ""

        rows.append({
            "path": path,
            "name": path.rsplit(".", 1)[-1],
            "indent": depth,
            "class": classes[0] if classes else "",
            "shape": fmt_shape(out.get("shape")),
            "params": fmt_count(sum(int(layer.get("num_params") or 0) for layer in members)),
            "static": num(out.get("health_predicted")),
            "probe": num(out.get("health_measured")),
            "grad_w": num(_norm_of(layer.get("param_grad_norm") for layer in members)),
            "ratio": num(_one([layer.get("param_grad_ratio") for layer in weighted])),
            "upd": num(_one([layer.get("update_ratio") for layer in weighted])),
            "dead": pct(max((float(layer["dead_fraction"]) for layer in members
                                 if _is_real(layer.get("dead_fraction"))), default=None)),
            "saturated": pct(max((float(layer["saturated_fraction"]) for layer in members
                                      if _is_real(layer.get("saturated_fraction"))),
                                     default=None)),
            "location": fmt_location(files.get(str(located.get("file")), located.get("file")),
                                     located.get("line")) if located else "",
            "css": "flagged" if flagged else "",
            # Indices of the node table's rows: the page builds a module's op rows from
            # them when it is unfolded (no second copy of every node in the file).
            "ops": list(children),
            "ops_attr": _ranges(children),
        })
    return rows


def _fact(label: str, value: Any = "", items: Sequence[str] = ()) -> dict[str, Any]:
    return {"label": label, "value": value if isinstance(value, str) else fmt_any(value),
            "entries": list(items)}


def _torch_version(doc: Mapping[str, Any]) -> str:
    """The PyTorch version if the document records one (top level, model or environment)."""
    model = doc.get("model") or {}
    env = doc.get("environment") or {}
    for source, key in ((doc, "torch_version"), (model, "torch_version"), (env, "torch"),
                        (env, "torch_version")):
        if isinstance(source, Mapping) and source.get(key):
            return str(source[key])
    return ""


def _facts(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    model: Mapping[str, Any] = doc.get("model") or {}
    trace: Mapping[str, Any] = model.get("trace") or {}
    probe: Mapping[str, Any] | None = doc.get("probe")
    facts = []
    if model.get("source"):
        facts.append(_fact("Source", str(model["source"])))
    params = fmt_count(model.get("num_parameters"))
    trainable = model.get("num_trainable_parameters")
    if trainable is not None and trainable != model.get("num_parameters"):
        params += f" ({fmt_count(model['num_trainable_parameters'])} trainable)"
    facts.append(_fact("Parameters", params))
    facts.append(_fact("Device", str(model.get("device", ""))))
    steps = doc.get("steps")
    if isinstance(steps, Mapping):  # a watched training run: no trace, no probe of its own
        facts.append(_fact("Watched", f"{fmt_count(steps.get('steps'))} optimizer step(s) "
                           f"of {steps.get('optimizer')} at learning rate "
                           f"{fmt_num(steps.get('lr'))}; modules every "
                           f"{fmt_count(steps.get('every'))}th step up to step "
                           f"{fmt_count(steps.get('horizon'))}"))
        facts.append(_fact("Modules watched", fmt_count(len(steps.get("modules") or {}))))
    else:
        facts.extend(_analysis_facts(model, trace, probe))
    facts.append(_fact("gradscope version", str(doc.get("gradscope_version", ""))))
    torch_version = _torch_version(doc)
    if torch_version:
        facts.append(_fact("PyTorch version", torch_version))
    facts.append(_fact("Schema version", doc.get("schema_version")))
    return facts


def _analysis_facts(model: Mapping[str, Any], trace: Mapping[str, Any],
                    probe: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """How a before-training analysis traced and probed the model."""
    facts = []
    method = str(trace.get("method", ""))
    facts.append(_fact("Trace method", method + ("" if trace.get("ok", True) else " (failed)")))
    if trace.get("message"):
        facts.append(_fact("Trace message", str(trace["message"])))
    attempts = trace.get("attempts") or []
    if attempts:
        facts.append(
            _fact(
                "Trace attempts",
                items=[
                    f"{a.get('method')}: "
                    + ("ok" if a.get("ok") else f"failed \u2013 {a.get('message') or 'no message'}")
                    for a in attempts
                ],
            )
        )
    if "coverage" in trace:
        cov = fmt_pct(trace.get("coverage"))
        if "num_nodes" in trace:
            cov += f" of {fmt_count(trace['num_nodes'])} nodes"
        facts.append(_fact("Op coverage", cov))
    if trace.get("unknown_ops"):
        facts.append(_fact("Unknown ops", ", ".join(str(o) for o in trace["unknown_ops"])))
    if "output" in model:
        facts.append(_fact("Output probed", str(model.get("output") or "\u2013")))
    inputs = model.get("inputs") or []
    if inputs:
        facts.append(_fact("Inputs", items=[f"#{i}: {fmt_any(x)}" for i, x in enumerate(inputs)]))
    if probe is None:
        facts.append(_fact("Probe", "not recorded"))
    elif not probe.get("enabled"):
        facts.append(_fact("Probe", "disabled (static analysis only)"))
    else:
        settings = [
            f"{key.replace('_', ' ')}: {fmt_any(probe[key])}"
            for key in ("device", "batches", "batch_size", "loss", "mode", "optimizer", "lr",
                        "seed", "output_grad_rms")
            if probe.get(key) is not None
        ]
        facts.append(_fact("Probe", "enabled", items=settings))
        for key, label in (("nonfinite_forward", "Non-finite forward"),
                           ("nonfinite_backward", "Non-finite backward")):
            if probe.get(key):
                facts.append(_fact(label, str(probe[key])))
    return facts


def build_view(doc: Mapping[str, Any]) -> dict[str, Any]:
    """Everything the template shows, already formatted; tolerant of optional fields."""
    model: Mapping[str, Any] = doc.get("model") or {}
    layers: list[Mapping[str, Any]] = list(doc.get("layers") or [])
    findings: list[Mapping[str, Any]] = list(doc.get("findings") or [])
    status = str(doc.get("status", ""))
    counts = [
        {"severity": sev, "count": sum(1 for f in findings if f.get("severity") == sev)}
        for sev in _SEVERITY_ORDER
    ]
    files = short_files(layers)
    rows = _layer_rows(layers, findings, files)
    return {
        "model_name": str(model.get("name", "model")),
        "status": status,
        "status_css": status if status in _STATUS_LABELS else "unknown",
        "status_label": _STATUS_LABELS.get(status, status or "Unknown"),
        "counts": counts,
        "groups": _finding_groups(findings),
        "num_findings": len(findings),
        "profile": depth_profile(layers, doc.get("summary") or {}),
        "weight_grads": weight_grad_chart(layers),
        "time_charts": time_charts(layers),
        "steps": steps_view(doc.get("steps")),
        "rows": rows,
        "modules": module_rows(layers, findings, files, model.get("modules") or {}),
        "files": [(short, full) for full, short in sorted(files.items(), key=lambda kv: kv[1])
                  if short != full],
        "has_update": any(layer.get("update_ratio") is not None for layer in layers),
        "graph": graph_view(doc),
        "facts": _facts(doc),
        "summary": [(str(k), fmt_any(v)) for k, v in (doc.get("summary") or {}).items()],
        "notes": [str(n) for n in doc.get("notes") or []],
        "version": str(doc.get("gradscope_version", "")),
        "report_json": script_json(doc),
    }


def render_html(doc: dict[str, Any]) -> str:
    """The report as one HTML5 page; deterministic (no timestamps) so reruns diff cleanly."""
    template = environment().get_template(TEMPLATE_NAME)
    return _pin_scripts(template.render(v=build_view(doc)))


def _pin_scripts(html: str) -> str:
    """Fill the CSP's script-src with the SHA-256 of each inline ``<script>`` on the page.

    Only the template's own scripts are bare ``<script>`` elements (model strings
    are escaped and the JSON block has a type), so the policy admits exactly
    them: an injected script would not run even if escaping ever failed.
    """
    hashes = sorted({
        "'sha256-" + base64.b64encode(hashlib.sha256(m.group(1).encode("utf-8")).digest())
        .decode("ascii") + "'"
        for m in _INLINE_SCRIPT.finditer(html)
    })
    policy = "script-src " + (" ".join(hashes) if hashes else "'none'")
    return html.replace(_CSP_SCRIPT_SENTINEL, policy, 1)


def write_html(doc: dict[str, Any], path: str | Path) -> None:
    """Write the page atomically (``-`` writes to stdout, for piping)."""
    text = render_html(doc)
    if str(path) == "-":
        import sys

        sys.stdout.write(text)
        sys.stdout.flush()
        return
    atomic_write_text(path, text)
