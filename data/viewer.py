"""HTML views of an annotated directory's examples: the token viewer, the scorer-agreement table, a page.

    from data.shard_stats import sample_examples
    from data.viewer import token_viewer_html, standalone_page
    examples = sample_examples("shards/demo", n=8, seed=0)
    html = standalone_page("tokens", token_viewer_html(examples, tokenizer, rho=0.7))

Shared by ``python -m annotate.view`` and ``evaluation.report``. The data (examples, groups,
agreement) comes from data/shard_stats.py; everything here is self-contained HTML, no external
resources.
"""

from __future__ import annotations

import html
import math
import re
from typing import Any

import numpy as np

from data.shard_stats import important_masks, trainable_mask

__all__ = ["token_texts", "token_viewer_html", "agreement_html", "standalone_page"]

_VIEWER_CSS = """
.token-viewer{font:14px/1.45 system-ui,sans-serif;margin:1em 0}
.token-viewer .tv-legend{color:#444;margin:.3em 0 .8em}
.token-viewer .tv-example{border:1px solid #ddd;border-radius:6px;padding:.5em .7em;margin:.6em 0}
.token-viewer .tv-head{font-size:12px;color:#555;margin-bottom:.3em}
.token-viewer .tv-tokens{font:13px/1.9 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;white-space:pre-wrap;word-break:break-word}
.token-viewer .tok{border-radius:2px;border-bottom:2px solid transparent}
.token-viewer .tok.p{color:#999}
.token-viewer .tok.imp{font-weight:700;border-bottom-color:#111}
.token-viewer .tv-more{font-size:12px;color:#777;margin-top:.3em}
.token-viewer .tv-key{padding:0 .3em;border-radius:2px}
""".strip()

# Keeps the shading formula in one place: Python writes the initial styles, the script the others.
_ALPHA_LO, _ALPHA_SPAN, _RGB = 0.08, 0.8, "230,97,0"

_VIEWER_JS = """
(function(){
var root=document.currentScript.closest('section.token-viewer');if(!root)return;
var sel=root.querySelector('select.score-select');if(!sel)return;
function shade(name){
root.querySelectorAll('.tv-example').forEach(function(ex){
var lo=parseFloat(ex.getAttribute('data-lo-'+name)),hi=parseFloat(ex.getAttribute('data-hi-'+name));
ex.querySelectorAll('span.tok').forEach(function(t){
t.classList.toggle('imp',t.getAttribute('data-group-'+name)==='1');
var v=parseFloat(t.getAttribute('data-score-'+name));
if(t.classList.contains('p')||!isFinite(v)||!isFinite(lo)){t.style.backgroundColor='';return;}
var f=hi>lo?Math.min(1,Math.max(0,(v-lo)/(hi-lo))):0.5;
t.style.backgroundColor='rgba(%RGB%,'+(%LO%+%SPAN%*f).toFixed(3)+')';
});});}
sel.addEventListener('change',function(){shade(sel.value);});
if(sel.selectedIndex>0)shade(sel.value);
})();
""".strip().replace("%RGB%", _RGB).replace("%LO%", str(_ALPHA_LO)).replace("%SPAN%", str(_ALPHA_SPAN))


def _attr(name: str) -> str:
    """A score name as an HTML attribute suffix (lowercase letters, digits, - and _)."""
    return re.sub(r"[^a-z0-9_-]", "-", name.lower())


def _cut_text(name: str, cut: Any) -> str:
    """``name > t`` plus, when tokens tie at ``t``, the share of them that is important."""
    text = f"{html.escape(name)} > {_num(float(cut))}"
    fraction = getattr(cut, "tie_fraction", 1.0)
    return text + (f", {100 * fraction:.3g}% of those = {_num(float(cut))}" if getattr(cut, "tied", 0.0) else " (or =)")


def _num(value: float) -> str:
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return format(value, ".6g")


def _shade(value: float, lo: float | None, hi: float | None) -> str:
    if lo is None or not math.isfinite(value):
        return ""
    f = min(1.0, max(0.0, (value - lo) / (hi - lo))) if hi > lo else 0.5
    return f"rgba({_RGB},{_ALPHA_LO + _ALPHA_SPAN * f:.3f})"


def _visible(text: str) -> str:
    """Whitespace made visible (newline as ↵ then a real line break, tab as ⇥), control chars escaped."""
    text = text.replace("\r\n", "\n").replace("\n", "↵\n").replace("\t", "⇥\t").replace("\r", "␍")
    return "".join(c if c in "\n\t" or c.isprintable() or c == " " else f"\\x{ord(c):02x}" for c in text)


def token_texts(tokenizer: Any, ids: list[int]) -> list[str]:
    """Each id decoded alone (``tokenizer.decode``); a piece of a multi-byte character falls back to
    ``convert_ids_to_tokens``. No tokenizer: ``#<id>``."""
    if tokenizer is None:
        return [f"#{i}" for i in ids]
    try:
        texts = list(tokenizer.batch_decode([[i] for i in ids], clean_up_tokenization_spaces=False))
    except (AttributeError, TypeError):
        texts = [tokenizer.decode([i]) for i in ids]
    raw = None
    for index, text in enumerate(texts):
        if text == "" or "\ufffd" in text:
            if raw is None:
                raw = tokenizer.convert_ids_to_tokens(list(ids))
            texts[index] = str(raw[index]) if raw[index] is not None else f"#{ids[index]}"
    return texts


def token_viewer_html(examples: list[dict[str, Any]], tokenizer: Any, rho: float, scope: str = "sequence",
                      thresholds: dict[str, Any] | None = None, title: str = "Token viewer", *,
                      max_tokens: int = 400) -> str:
    """A self-contained HTML fragment showing each example's tokens shaded by score.

    One ``<span class="tok">`` per shown token with ``data-score-<name>`` (the value) and
    ``data-group-<name>`` (``1`` important, ``0`` not, empty when the token is not trainable) for
    every score; class ``p`` marks non-trainable tokens (greyed), class ``imp`` the important ones of
    the selected score (bold, underlined). The ``<select class="score-select">`` switches the score
    (inline script); with scripts off the first score's shading is already in the style
    attributes. Shading: the score normalised over the example's trainable tokens. At most
    ``max_tokens`` tokens per example are shown. ``tokenizer`` None shows ids.
    """
    rho = float(rho)
    names: list[str] = []
    for example in examples:
        names += [name for name in example["scores"] if name not in names]
    first = names[0] if names else None
    esc = html.escape
    out = [f'<section class="token-viewer"><style>{_VIEWER_CSS}</style>', f"<h2>{esc(title)}</h2>"]
    if names:
        options = "".join(f'<option value="{esc(_attr(n))}"{" selected" if n == first else ""}>{esc(n)}</option>' for n in names)
        out.append(f'<div class="tv-controls"><label>Score <select class="score-select">{options}</select></label></div>')
    top = f"top {100 * (1 - rho):.4g}% (ceil) of trainable tokens by score"
    if scope == "corpus":
        rule = (f"scope corpus: a token is important when its score is above the corpus threshold, the "
                f"rho-quantile of the manifest's score statistics ({', '.join(_cut_text(n, t) for n, t in (thresholds or {}).items())}); "
                f"of the tokens tied at the threshold, the share shown is important, chosen by a hash of (example id, position)")
    elif scope == "batch":
        rule = f"scope batch, each example shown as its own batch: the {top}"
    else:
        rule = f"scope sequence: in each example the {top}"
    out.append(
        f'<p class="tv-legend">rho = {rho:g}, {rule}. <b><u>Bold underlined</u></b>: important (group 1) for the '
        f'selected score; <span style="color:#999">grey</span>: not trainable (prompt; position 0 never is); '
        f'background: the score normalised over the example\'s trainable tokens '
        f'(<span class="tv-key" style="background:{_shade(0.0, 0.0, 1.0)}">low</span> → '
        f'<span class="tv-key" style="background:{_shade(1.0, 0.0, 1.0)}">high</span>). '
        f"Hover a token for its id, scores and groups.</p>"
    )
    if not examples:
        out.append('<p class="tv-legend">No examples.</p>')
    for example in examples:
        ids = [int(i) for i in example["input_ids"]]
        trainable = trainable_mask(example["loss_mask"])
        if len(trainable) != len(ids):
            raise ValueError(f"example {example.get('id')}: loss_mask has {len(trainable)} entries for {len(ids)} tokens")
        scores = {name: np.asarray(values, dtype=np.float64) for name, values in example["scores"].items()}
        groups = important_masks(example, rho, scope, thresholds)
        bounds: dict[str, tuple[float | None, float | None]] = {}
        for name, values in scores.items():
            finite = values[trainable & np.isfinite(values)]
            bounds[name] = (float(finite.min()), float(finite.max())) if finite.size else (None, None)
        attrs = "".join(f' data-lo-{_attr(n)}="{_num(lo)}" data-hi-{_attr(n)}="{_num(hi)}"'
                        for n, (lo, hi) in bounds.items() if lo is not None)
        shown = min(len(ids), max(int(max_tokens), 0))
        texts = token_texts(tokenizer, ids[:shown])
        counts = ", ".join(f"{esc(n)} {sum(g)}" for n, g in groups.items())
        head = (f"<b>{esc(str(example.get('id', '')))}</b> · {esc(str(example.get('source', '')))} · {len(ids)} tokens, "
                f"{int(trainable.sum())} trainable" + (f" · important: {counts}" if counts else ""))
        spans = []
        for t in range(shown):
            classes = "tok" if trainable[t] else "tok p"
            data, tips = [], [f"id {ids[t]}" + ("" if trainable[t] else " (not trainable)")]
            for name, values in scores.items():
                value = float(values[t])
                group = ("1" if groups[name][t] else "0") if name in groups and trainable[t] else ""
                data.append(f' data-score-{_attr(name)}="{_num(value)}" data-group-{_attr(name)}="{group}"')
                tips.append(f"{name}: {_num(value)}" + {"1": " (important)", "0": " (unimportant)", "": ""}[group])
            style = ""
            if first is not None and first in scores:
                if trainable[t]:
                    colour = _shade(float(scores[first][t]), *bounds[first])
                    style = f' style="background-color:{colour}"' if colour else ""
                if first in groups and groups[first][t]:
                    classes += " imp"
            spans.append(f'<span class="{classes}"{"".join(data)} title="{esc(chr(10).join(tips)).replace(chr(10), "&#10;")}"{style}>'
                         f"{esc(_visible(texts[t]))}</span>")
        more = f'<div class="tv-more">… {len(ids) - shown} more tokens</div>' if shown < len(ids) else ""
        out.append(f'<div class="tv-example" data-id="{esc(str(example.get("id", "")))}"{attrs}>'
                   f'<div class="tv-head">{head}</div><div class="tv-tokens">{"".join(spans)}</div>{more}</div>')
    if names:
        out.append(f"<script>{_VIEWER_JS}</script>")
    out.append("</section>")
    return "\n".join(out)


def agreement_html(agreement: dict[str, Any]) -> str:
    """``scorer_agreement``'s result as a small HTML table (class ``agreement``)."""
    esc = html.escape
    names = agreement.get("scores", [])
    caption = (f"Scorer agreement at rho = {float(agreement.get('rho', 0)):g} (scope {esc(str(agreement.get('scope', 'sequence')))}): "
               f"mean Jaccard overlap |A∩B| / |A∪B| of the important tokens over {int(agreement.get('examples', 0))} examples")
    rows = ["<tr><th></th>" + "".join(f"<th>{esc(n)}</th>" for n in names) + "</tr>"]
    for name, values in zip(names, agreement.get("overlap", [])):
        cells = "".join(f"<td>{'–' if v is None else f'{v:.3f}'}</td>" for v in values)
        rows.append(f"<tr><th>{esc(name)}</th>{cells}</tr>")
    return ('<table class="agreement" style="border-collapse:collapse;font:13px system-ui,sans-serif">'
            f"<caption style=\"text-align:left;padding:.3em 0\">{caption}</caption>" + "".join(rows) + "</table>"
            "<style>table.agreement th,table.agreement td{border:1px solid #ccc;padding:.2em .6em;text-align:right}</style>")


def standalone_page(title: str, body_html: str) -> str:
    """A complete HTML page (no external resources) around the given fragments."""
    return (
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n"
        "<style>body{font:14px/1.45 system-ui,sans-serif;margin:1.5rem auto;max-width:75rem;padding:0 1rem;color:#111}</style>\n"
        f"</head>\n<body>\n<h1>{html.escape(title)}</h1>\n{body_html}\n</body>\n</html>\n"
    )
