"""The self-contained HTML page: each token coloured by importance, a layer slider, a module
choice (attn / mlp / both mean) and the skip mask at a chosen ratio.

Everything (data, style, script) is inline: the page opens offline from a file, with no CDN and no
request of any kind. Token text is inserted with ``textContent``, never as HTML.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import torch

from gateskip.analysis.heatmap import split_by_kind
from gateskip.policies import threshold_from_grid

RATIO_STEPS = 100  # the page's ratio slider moves in steps of 1 / RATIO_STEPS


def thresholds_by_kind(grid: torch.Tensor, branches: list[str]) -> dict[str, list[list[float | None]]]:
    """Calibrated thresholds ``{kind: [layer][step]}`` for ratios 0, 0.01, ..., 1 (None at the ends:
    ratio 0 skips nothing, ratio 1 everything)."""
    out: dict[str, list] = {}
    for kind in ("attn", "mlp"):
        rows = sorted((int(n.split(".")[1]), j) for j, n in enumerate(branches) if n.endswith("." + kind))
        out[kind] = [[None if s in (0, RATIO_STEPS) else float(threshold_from_grid(grid[j], s / RATIO_STEPS))
                      for s in range(RATIO_STEPS + 1)] for _, j in rows]
    return out


def page_data(imp: torch.Tensor, labels: list[str], texts: list[str], branches: list[str],
              grid: torch.Tensor | None, ratio: float, title: str) -> dict:
    panels = split_by_kind(imp, branches)
    return {
        "title": title,
        "labels": labels,
        "newline": ["\n" in t for t in texts],
        "layers": {k: layers for k, (_, layers) in panels.items()},
        # full float32 precision: lightly trained gates differ only in the 6th-7th decimal
        "imp": {k: a.tolist() for k, (a, _) in panels.items()},
        "thresholds": thresholds_by_kind(grid, branches) if grid is not None else None,
        "ratio": ratio,
    }


def _script_json(data: dict) -> str:
    # Inside <script>, "</" could close the element early; "<\/" is the same string to JSON.
    return json.dumps(data, ensure_ascii=False).replace("</", "<\\/").replace("<!--", "<\\!--")


def write_html(path: str | Path, imp: torch.Tensor, labels: list[str], texts: list[str], branches: list[str],
               grid: torch.Tensor | None = None, ratio: float = 0.3, title: str = "") -> Path:
    """Write the page for ``imp [tokens, branches]``; ``grid`` = calibration quantiles, if any."""
    title = title or "GateSkip token importance"
    data = page_data(imp, labels, texts, branches, grid, ratio, title)
    page = _TEMPLATE.replace("%TITLE%", html.escape(title)).replace("%DATA%", _script_json(data))
    path = Path(path)
    path.write_text(page, encoding="utf-8")
    return path


_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>%TITLE%</title>
<style>
body { font-family: system-ui, sans-serif; margin: 1.2em; color: #222; max-width: 70em; }
h1 { font-size: 1.15em; }
.controls { display: flex; flex-wrap: wrap; gap: 0.6em 1.6em; align-items: center; margin: 0.6em 0;
  padding: 0.6em; background: #f4f4f4; border-radius: 6px; }
.controls label { white-space: nowrap; }
#text { font-family: ui-monospace, monospace; font-size: 15px; line-height: 2.1; }
.tok { padding: 2px 1px; margin: 0 1px; border-radius: 3px; white-space: pre; }
.tok.some { text-decoration: underline dotted #d00 2px; }
.tok.all { text-decoration: line-through #d00 2px; opacity: 0.75; }
#legend { font-size: 0.85em; color: #555; }
#bar { display: inline-block; width: 12em; height: 0.9em; vertical-align: middle; border: 1px solid #999; }
</style></head>
<body>
<h1 id="title"></h1>
<div class="controls">
  <label>module <select id="module"></select></label>
  <label>layer <input id="layer" type="range" min="0" value="0" step="1"> <span id="layerval"></span></label>
  <label><input id="alllayers" type="checkbox"> mean over all layers</label>
  <label>colour <select id="scale"><option value="view">min-max of this view</option>
    <option value="abs">absolute 0-1</option></select></label>
  <label>skip ratio <input id="ratio" type="range" min="0" max="1" step="0.01"> <span id="ratioval"></span></label>
  <label>policy <select id="policy"></select></label>
</div>
<div id="legend"><span id="lo"></span> <span id="bar"></span> <span id="hi"></span>
  &nbsp; <u style="text-decoration: underline dotted #d00 2px">dotted</u>: skipped by some selected branches,
  <s style="text-decoration: line-through #d00 2px">struck</s>: skipped by all of them.
  <span id="summary"></span><br>Importance = mean gate over hidden units, from one dense run (nothing
  skipped); the mask shows what each branch would skip given those importances. Hover a token for values.</div>
<div id="text"></div>
<script type="application/json" id="data">%DATA%</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const $ = (id) => document.getElementById(id);
const kinds = Object.keys(D.imp);
const nLayers = Math.max(...kinds.map((k) => D.imp[k].length));
const nTok = D.labels.length;
const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];

function colour(t) {  // viridis, t in [0, 1]
  t = Math.min(1, Math.max(0, t)) * (VIRIDIS.length - 1);
  const i = Math.min(VIRIDIS.length - 2, Math.floor(t)), f = t - i;
  return VIRIDIS[i].map((c, j) => Math.round(c + f * (VIRIDIS[i + 1][j] - c)));
}
function roundHalfEven(x) {  // torch.round, which quantile_skip uses
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}
function quantileSkip(vals, ratio) {  // mirrors gateskip.policies.quantile_skip (ties by position)
  const k = roundHalfEven(vals.length * ratio);
  const order = vals.map((v, i) => [v, i]).sort((a, b) => a[0] - b[0] || a[1] - b[1]);
  const skip = new Array(vals.length).fill(false);
  for (let r = 0; r < k; r++) skip[order[r][1]] = true;
  return skip;
}
function thresholdSkip(vals, kind, layer, ratio) {  // mirrors threshold_skip with calibrated thresholds
  const step = Math.round(ratio * 100);
  if (step <= 0) return vals.map(() => false);
  if (step >= 100) return vals.map(() => true);
  const thr = D.thresholds[kind][layer][step];
  return vals.map((v) => v < thr);
}

const spans = [];
const box = $("text");
D.labels.forEach((label, i) => {
  const s = document.createElement("span");
  s.className = "tok";
  s.textContent = label;
  box.appendChild(s);
  spans.push(s);
  if (D.newline[i]) box.appendChild(document.createElement("br"));
});

$("title").textContent = D.title;
for (const k of kinds) $("module").add(new Option(k, k));
if (kinds.length > 1) $("module").add(new Option("both (mean)", "both", true, true));
$("layer").max = nLayers - 1;
$("ratio").value = D.ratio;
const pol = $("policy");
if (D.thresholds) pol.add(new Option("calibrated thresholds", "threshold"));
pol.add(new Option("per-sequence quantile", "quantile"));
$("bar").style.background = "linear-gradient(to right, " + [0, 0.25, 0.5, 0.75, 1].map(
  (t) => "rgb(" + colour(t).join(",") + ")").join(", ") + ")";

function selected() {  // [[kind, layer], ...] of the branches the controls select
  const mods = $("module").value === "both" ? kinds : [$("module").value];
  const layers = $("alllayers").checked ? [...Array(nLayers).keys()] : [Number($("layer").value)];
  const out = [];
  for (const k of mods) for (const l of layers) if (l < D.imp[k].length) out.push([k, l]);
  return out;
}

function render() {
  const sel = selected(), ratio = Number($("ratio").value), policy = pol.value;
  $("layerval").textContent = $("alllayers").checked ? "(all)" : $("layer").value;
  $("ratioval").textContent = ratio.toFixed(2);
  const mean = new Array(nTok).fill(0), skipped = new Array(nTok).fill(0);
  for (const [k, l] of sel) {
    const vals = D.imp[k][l];
    const skip = policy === "threshold" ? thresholdSkip(vals, k, l, ratio) : quantileSkip(vals, ratio);
    vals.forEach((v, i) => { mean[i] += v / sel.length; skipped[i] += skip[i] ? 1 : 0; });
  }
  let lo = 0, hi = 1;
  if ($("scale").value === "view") { lo = Math.min(...mean); hi = Math.max(...mean); }
  const span = hi - lo > 1e-9 ? hi - lo : 1;
  spans.forEach((s, i) => {
    const c = colour((mean[i] - lo) / span);
    s.style.background = "rgb(" + c.join(",") + ")";
    s.style.color = 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2] > 140 ? "#000" : "#fff";
    s.classList.toggle("all", skipped[i] === sel.length && sel.length > 0);
    s.classList.toggle("some", skipped[i] > 0 && skipped[i] < sel.length);
    s.title = D.labels[i] + "\\nimportance " + mean[i].toFixed(8) + "\\nskipped by " + skipped[i] + " of "
      + sel.length + " selected branches";
  });
  const digits = Math.min(9, Math.max(3, Math.ceil(-Math.log10(span)) + 2));
  $("lo").textContent = lo.toFixed(digits);
  $("hi").textContent = hi.toFixed(digits);
  const n = skipped.reduce((a, b) => a + b, 0);
  $("summary").textContent = " Skipped: " + (100 * n / Math.max(1, nTok * sel.length)).toFixed(1)
    + "% of (token, branch) pairs.";
}
["module", "layer", "alllayers", "scale", "ratio", "policy"].forEach((id) => $(id).addEventListener("input", render));
render();
</script>
</body></html>
"""
