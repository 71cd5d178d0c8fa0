"""One self-contained HTML report (plus PNG plots) for one or more training runs.

    python -m evaluation.report runs/sft runs/sftgo --output runs/report

Per run it reads ``config.yaml`` and ``metrics.jsonl`` (written by ``train/main.py``) and, when
present, ``evaluation.json`` (written by ``python -m evaluation.run``). The page shows:

- training loss curves per run: CE with the important and unimportant group losses (as the SFT-GO
  paper's Figure 2) and the optimised loss;
- lambda over steps, all runs on one axis;
- held-out CE and group losses side by side across runs (the trainer's periodic evaluation);
- per source (the shards' ``source`` column): the training CE and group losses with the tokens trained, curves
  over steps, and the held-out ones of the trainer's last evaluation and of ``evaluation.run``;
- benchmark accuracies, per-group held-out losses and sample generations from ``evaluation.run``;
- a token viewer over examples of the runs' shards: tokens shaded by each scorer's score and marked
  by group at the run's rho and scope (the same grouping code as training);
- agreement between scorers: overlap of their important sets at rho.

Shards are read with Polars lazy scans (``data/shard_stats.py``), so the report works on directories
larger than memory. Every plot is also written as a PNG next to ``report.html`` and embedded in the
page as a data URI, so the HTML file alone is the whole report (no network, no external files).
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from schemas.shard import atomic_write_text, program
from train import config as train_config

GROUP_COLORS = {"ce": "#333333", "important_loss": "#d62728", "unimportant_loss": "#1f77b4", "loss": "#9467bd"}
GROUP_LABELS = {"ce": "CE (all trainable tokens)", "important_loss": "important group", "unimportant_loss": "unimportant group",
                "loss": "optimised loss"}
EVAL_KEYS = ("eval_ce", "eval_important_loss", "eval_unimportant_loss")


class ReportError(ValueError):
    """A run directory or option the report cannot use; the message names it."""


@dataclass
class Run:
    """What the report needs of one run directory."""

    name: str
    path: Path
    config: dict[str, Any]
    steps: list[dict[str, Any]]  # training records, one per step (the last one logged wins after a resume)
    evals: list[dict[str, Any]]  # held-out evaluation records (trainer), in step order
    evaluation: dict[str, Any] | None = None  # evaluation.run's evaluation.json
    summary: dict[str, Any] = field(default_factory=dict)

    def setting(self, dotted: str, default: Any = None) -> Any:
        """A config value by dotted key (``importance.rho``)."""
        node: Any = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    @property
    def label(self) -> str:
        """``name (the loss's own short label)``, e.g. ``sftgo (sftgo, tfidf, rho 0.7)``."""
        from train.losses import LOSSES

        loss = self.setting("loss.name", "?")
        return f"{self.name} ({LOSSES[loss].label(self.setting) if loss in LOSSES else loss})"

    @property
    def weights_trained(self) -> str:
        """What the run trained: ``full weights``, or its LoRA adapters (``lora.*``) on the frozen base."""
        rank = self.setting("lora.rank", 0) or 0
        if not rank:
            return "full weights"
        alpha = self.setting("lora.alpha")
        targets = self.setting("lora.target_modules", ["all-linear"])
        return (f"LoRA adapters: rank {rank}, alpha {2 * rank if alpha is None else alpha:g} on "
                f"{','.join(targets) if isinstance(targets, list) else targets}, of base {self.setting('model', '?')} (frozen)")

    @property
    def training_groups(self) -> str:
        """What the training curves' important / unimportant groups are: rho1's live selection, else the
        load-time grouping (importance.scorer, rho, scope)."""
        if self.setting("loss.name") == "rho1":
            rho = self.setting("loss.rho1_rho")
            rho = self.setting("importance.rho") if rho is None else rho
            return f"Rho-1 live selection (top {1 - float(rho):.0%} by live excess loss, per step)"
        return grouping_label(self.setting("importance.scorer"), self.setting("importance.rho"), self.setting("importance.scope"))

    @property
    def trainer_eval_groups(self) -> str:
        """The grouping of the trainer's held-out numbers: train.config.eval_grouping (eval.*, else importance.*)."""
        try:
            cfg = train_config.load_config(["--config", str(self.path / "config.yaml")])
            return grouping_label(*train_config.eval_grouping(cfg))
        except (ValueError, OSError):
            scorer = self.setting("eval.scorer") or self.setting("importance.scorer")
            rho = self.setting("eval.rho")
            return grouping_label(scorer, self.setting("importance.rho") if rho is None else rho,
                                  self.setting("eval.scope") or self.setting("importance.scope"))

    @property
    def source_groups(self) -> str:
        """The grouping of the per-source training group losses: the load-time one (importance.*) for every loss,
        rho1 included (train/step.py sums them from the loaded groups, not from a loss's own selection)."""
        return grouping_label(self.setting("importance.scorer"), self.setting("importance.rho"), self.setting("importance.scope"))

    def source_name(self, key: str, split: str) -> str:
        """The ``source`` value behind a metric key (train_summary.json's ``sources``; the key itself before the run
        has finished or when the value was already a safe key)."""
        return (self.summary.get("sources") or {}).get(split, {}).get(key, key)

    def source_keys(self, prefix: str, records: list[dict[str, Any]]) -> list[str]:
        """The source keys logged under ``prefix`` (``source/`` or ``eval_source/``) in ``records``, in first-seen order."""
        return list(dict.fromkeys(k[len(prefix):].rpartition("/")[0] for r in records for k in r if k.startswith(prefix)))

    @property
    def lambda_applies(self) -> bool:
        """Whether the run has a lambda (SFT-GO's weight on the worse group); rho1 trains only its selection."""
        return self.setting("loss.name") == "sftgo"


def grouping_label(scorer: Any, rho: Any, scope: Any) -> str:
    """A load-time grouping in words: ``score tfidf, rho 0.7, sequence scope`` (``no groups`` for scorer none)."""
    if scorer == "none":
        return "no groups (no score)"
    return f"score {scorer}, rho {rho}, {scope} scope"


def heldout_groups(record: dict[str, Any]) -> str:
    """The grouping of one evaluation.run held-out record."""
    return grouping_label(record.get("scorer"), record.get("rho"), record.get("scope"))


# ---------------------------------------------------------------------------------------------
# Reading run directories
# ---------------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                # A run killed mid-write can leave a torn last line: skip only that one, loudly.
                if not f.read().strip():
                    print(f"warning: {path}:{number}: incomplete last line skipped ({exc.msg})", file=sys.stderr)
                    break
                raise ReportError(f"{path}:{number}: not JSON ({exc.msg})") from exc
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ReportError(f"{path}:{number}: expected an object with an integer 'step'")
            records.append(record)
    return records


def load_run(path: str | Path, name: str | None = None) -> Run:
    """Read one run directory; raises :class:`ReportError` naming the missing or bad file."""
    path = Path(path)
    if not path.is_dir():
        raise ReportError(f"{path}: not a directory (expected a training run: config.yaml, metrics.jsonl)")
    config_path, metrics_path = path / "config.yaml", path / "metrics.jsonl"
    for needed in (config_path, metrics_path):
        if not needed.is_file():
            raise ReportError(f"{needed}: missing; is {path} a run directory of train/main.py?")
    try:
        config = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ReportError(f"{config_path}: not valid YAML ({exc})") from exc
    if not isinstance(config, dict):
        raise ReportError(f"{config_path}: expected a mapping of config keys")
    by_step: dict[int, dict[str, Any]] = {}
    evals_by_step: dict[int, dict[str, Any]] = {}
    for record in _read_jsonl(metrics_path):
        # After a resume the steps past the checkpoint are logged again: the later line wins.
        if "loss" in record:
            by_step[record["step"]] = record
        if "eval_ce" in record:
            evals_by_step[record["step"]] = {k: record[k] for k in record if k == "step" or k.startswith("eval_")}
    if not by_step:
        raise ReportError(f"{metrics_path}: no training steps logged yet")
    evaluation = None
    eval_path = path / "evaluation.json"
    if eval_path.is_file():
        try:
            evaluation = json.loads(eval_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ReportError(f"{eval_path}: not JSON ({exc.msg})") from exc
    summary_path = path / "train_summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else {}
    return Run(name=name or path.resolve().name, path=path, config=config, steps=[by_step[s] for s in sorted(by_step)],
               evals=[evals_by_step[s] for s in sorted(evals_by_step)], evaluation=evaluation, summary=summary)


def _unique_names(paths: list[Path]) -> list[str]:
    """Run names for the legend: the folder name, with its parent when two runs share it."""
    names = [p.resolve().name for p in paths]
    return [f"{p.resolve().parent.name}/{n}" if names.count(n) > 1 else n for p, n in zip(paths, names)]


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib, headless)
# ---------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot's import
    import matplotlib.pyplot as plt

    return plt


def overlapping_texts(fig: Any) -> list[tuple[str, str]]:
    """Pairs of visible text boxes of a drawn figure that overlap (titles, labels, tick and bar labels, legends)."""
    from matplotlib.text import Text

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    # Tick labels exist for ticks outside the view too (stale positions, not drawn): only the drawn ones count.
    all_ticks, drawn_ticks = set(), set()
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            all_ticks |= {id(t) for tick in axis.majorTicks + axis.minorTicks for t in (tick.label1, tick.label2)}
            drawn_ticks |= {id(t) for tick in axis._update_ticks() for t in (tick.label1, tick.label2)}
    boxes = []
    for text in fig.findobj(Text):
        if id(text) in all_ticks and id(text) not in drawn_ticks:
            continue
        if text.get_visible() and text.get_text().strip() and (text.axes is None or text.axes.get_visible()):
            box = text.get_window_extent(renderer).padded(-1.0)  # touching is not overlapping
            if box.width > 0 and box.height > 0:
                boxes.append((text.get_text(), box))
    return [(a, b) for i, (a, box_a) in enumerate(boxes) for b, box_b in boxes[i + 1:] if box_a.overlaps(box_b)]


def _save(fig: Any, out: Path) -> Path:
    for a, b in overlapping_texts(fig):  # a layout that does not fit: say so rather than ship it silently
        print(f"warning: {out.name}: text {a!r} overlaps {b!r}", file=sys.stderr)
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    tmp.replace(out)
    _pyplot().close(fig)
    return out


def plot_loss_curves(runs: list[Run], out: Path) -> Path:
    """One panel per run: CE and the important / unimportant group losses over steps (Figure 2), with
    evaluation.run's held-out group losses of the final model as diamonds after the last step."""
    import textwrap

    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    cols = min(3, len(runs))
    rows = math.ceil(len(runs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.9 * rows), squeeze=False, sharey=True, layout="constrained")
    for ax, run in zip(axes.flat, runs):
        steps = [r["step"] for r in run.steps]
        for key in ("important_loss", "unimportant_loss", "ce"):
            ax.plot(steps, [r.get(key, float("nan")) for r in run.steps], color=GROUP_COLORS[key], label=GROUP_LABELS[key],
                    linestyle="--" if key == "ce" else "-", marker="." if len(steps) < 30 else None)
        if run.setting("loss.name") not in ("sft", None):
            ax.plot(steps, [r.get("loss", float("nan")) for r in run.steps], color=GROUP_COLORS["loss"], alpha=0.6,
                    label=GROUP_LABELS["loss"], linestyle=":")
        # evaluation.run's per-group held-out losses of the final model, beside the curves they end.
        for record in (run.evaluation or {}).get("heldout", [])[:1]:
            for key in ("important_loss", "unimportant_loss", "ce"):
                if isinstance(record.get(key), (int, float)):
                    ax.scatter([steps[-1] + 0.04 * max(1, steps[-1])], [record[key]], marker="D", s=28,
                               color=GROUP_COLORS[key], edgecolors="white", zorder=3,
                               label="held-out (evaluation.run)" if key == "important_loss" else None)
        title = textwrap.wrap(run.label, 48) + textwrap.wrap(f"groups: {run.training_groups}", 56)
        held = (run.evaluation or {}).get("heldout", [])[:1]
        if held:
            title += textwrap.wrap(f"diamonds: {heldout_groups(held[0])}", 56)
        ax.set_title("\n".join(title), fontsize=8)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(runs):]:
        ax.set_visible(False)
    for row in axes:
        row[0].set_ylabel("loss (nats / token)")
    handles = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=min(5, len(handles)), fontsize=8)
    fig.suptitle("Training loss by token group", fontsize=11)
    return _save(fig, out)


def plot_lambda(runs: list[Run], out: Path) -> Path:
    """lambda (the weight of the worse group's loss) over steps, every run on one axis."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9.5, 3.4), layout="constrained")
    for run in runs:
        if not run.lambda_applies:  # (named as not applicable beside the plot)
            continue
        ax.plot([r["step"] for r in run.steps], [r.get("lambda", 0.0) for r in run.steps], label=run.label,
                marker="." if len(run.steps) < 30 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("lambda")
    ax.set_ylim(-0.05, 1.05)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if any(run.lambda_applies for run in runs):
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title("lambda over steps (runs with a lambda; rho1: not applicable)", fontsize=11)
    return _save(fig, out)


def plot_heldout(runs: list[Run], out: Path) -> Path | None:
    """Held-out CE and group losses: final values side by side (bars) and CE over steps (lines)."""
    with_evals = [run for run in runs if run.evals]
    if not with_evals:
        return None
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    fig, (bars, lines) = plt.subplots(1, 2, figsize=(12, 4.6), layout="constrained")
    width = 0.8 / len(with_evals)
    top = 0.0
    for index, run in enumerate(with_evals):
        final = run.evals[-1]
        xs = [k + (index - (len(with_evals) - 1) / 2) * width for k in range(len(EVAL_KEYS))]
        values = [final.get(key, float("nan")) for key in EVAL_KEYS]
        top = max([top] + [v for v in values if v == v])
        drawn = bars.bar(xs, values, width=width, label=f"{run.label}; groups: {run.trainer_eval_groups}")
        # Vertical labels: side by side they never collide, however many runs there are.
        bars.bar_label(drawn, fmt="%.3f", fontsize=7, rotation=90, padding=2)
        lines.plot([e["step"] for e in run.evals], [e.get("eval_ce", float("nan")) for e in run.evals], marker="o", label=run.label)
    bars.set_ylim(0, top * 1.25 if top > 0 else 1.0)  # room for the labels above the tallest bar
    bars.set_xticks(range(len(EVAL_KEYS)), ["CE", "important group", "unimportant group"])
    bars.set_ylabel("held-out loss (nats / token)")
    bars.set_title("trainer's held-out losses at its last evaluation", fontsize=10)
    fig.legend(*bars.get_legend_handles_labels(), loc="outside lower center", ncols=1, fontsize=8)
    lines.xaxis.set_major_locator(MaxNLocator(integer=True))
    lines.set_xlabel("step")
    lines.set_ylabel("held-out CE")
    lines.set_title("held-out CE over steps", fontsize=10)
    lines.grid(alpha=0.3)
    return _save(fig, out)


def plot_source_curves(runs: list[Run], out: Path) -> Path | None:
    """One panel per run with per-source numbers: each source's training CE over the logged steps (solid; each point
    covers the steps since the one before, train.log_every) and its held-out CE at the trainer's evaluations
    (dashed, same colour). None when no run logged per-source numbers."""
    import textwrap

    from matplotlib.ticker import MaxNLocator

    with_sources = [run for run in runs if run.source_keys("source/", run.steps)]
    if not with_sources:
        return None
    plt = _pyplot()
    cols = min(3, len(with_sources))
    rows = math.ceil(len(with_sources) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.9 * rows), squeeze=False, sharey=True, layout="constrained")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, run in zip(axes.flat, with_sources):
        keys = list(dict.fromkeys(run.source_keys("source/", run.steps) + run.source_keys("eval_source/", run.evals)))
        for index, key in enumerate(keys):
            color = colors[index % len(colors)]
            logged = [r for r in run.steps if f"source/{key}/ce" in r]
            if logged:
                ax.plot([r["step"] for r in logged], [r[f"source/{key}/ce"] for r in logged], color=color,
                        marker="." if len(logged) < 30 else None, label=f"{textwrap.shorten(run.source_name(key, 'train'), 40)} (training)")
            held = [e for e in run.evals if f"eval_source/{key}/ce" in e]
            if held:
                ax.plot([e["step"] for e in held], [e[f"eval_source/{key}/ce"] for e in held], color=color, linestyle="--",
                        marker="o", markersize=3, label=f"{textwrap.shorten(run.source_name(key, 'validation'), 40)} (held-out)")
        ax.set_title("\n".join(textwrap.wrap(run.label, 48)), fontsize=8)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(with_sources):]:
        ax.set_visible(False)
    for row in axes:
        row[0].set_ylabel("CE (nats / token)")
    fig.suptitle("CE per source: training (solid) and the trainer's held-out evaluations (dashed)", fontsize=11)
    return _save(fig, out)


def plot_agreement(agreement: dict[str, Any], out: Path) -> Path | None:
    """Heatmap of the overlap (Jaccard) of the scorers' important sets."""
    names = agreement.get("scores") or []
    if len(names) < 2:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(0.9 * len(names) + 2.0, 0.75 * len(names) + 1.2))
    # None = no example had trainable tokens for both scores: shown blank, not as 0.
    overlap = [[math.nan if value is None else value for value in row] for row in agreement["overlap"]]
    image = ax.imshow(overlap, vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    for i, row in enumerate(overlap):
        for j, value in enumerate(row):
            if math.isnan(value):
                continue
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black", fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.046)
    ax.set_title(f"important-set overlap at rho {agreement.get('rho')}", fontsize=10)
    return _save(fig, out)


# ---------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, Segoe UI, sans-serif; margin: 24px auto; max-width: 1200px; color: #222; padding: 0 16px; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 32px; border-bottom: 1px solid #ddd; }
table.data { border-collapse: collapse; margin: 8px 0; font-size: 13px; }
table.data th, table.data td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
table.data th:first-child, table.data td:first-child { text-align: left; }
img.plot { max-width: 100%; border: 1px solid #eee; }
.note { color: #666; font-size: 12px; }
.gen { display: grid; gap: 8px; } .gen pre { white-space: pre-wrap; background: #f7f7f7; padding: 6px; margin: 0; }
"""


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        return "—" if math.isnan(value) else f"{value:.{digits}f}"
    return html.escape(str(value)) if value is not None else "—"


def _table(header: list[str], rows: list[list[Any]], cls: str = "data") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _img(path: Path | None, alt: str) -> str:
    if path is None:
        return ""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img class="plot" alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption class="note">{html.escape(path.name)}</figcaption></figure>'


def objective(run: Run) -> str:
    """The run's real objective in one line, from its saved config (train.losses' own description)."""
    from train.losses import build_loss

    try:
        cfg = train_config.load_config(["--config", str(run.path / "config.yaml")])
        return build_loss(cfg.loss.name, **train_config.loss_options(cfg)).describe()
    except (ValueError, OSError, TypeError) as exc:
        return f"{run.setting('loss.name')} (config not readable here: {exc})"


def runs_table(runs: list[Run]) -> str:
    """One row per run: its objective, its grouping and its last training / trainer held-out numbers."""
    rows = []
    for run in runs:
        last = run.steps[-1]
        final_eval = run.evals[-1] if run.evals else {}
        batches = run.setting("eval.max_batches")
        rows.append([run.name, run.setting("loss.name"), objective(run) + ("" if run.weights_trained == "full weights" else f"; {run.weights_trained}"), run.training_groups, run.trainer_eval_groups,
                     last["step"], float(last.get("loss", math.nan)), float(last.get("ce", math.nan)),
                     float(final_eval.get("eval_ce", math.nan)), float(final_eval.get("eval_important_loss", math.nan)),
                     float(final_eval.get("eval_unimportant_loss", math.nan)),
                     f"step {final_eval['step']}, {batches or 'all'} batches" if final_eval else "—"])
    return (_table(["run", "loss", "objective", "training-curve groups", "trainer held-out groups", "steps", "last loss", "last CE",
                    "trainer held-out CE", "trainer held-out important", "trainer held-out unimportant", "trainer eval"], rows)
            + '<p class="note">Trainer held-out numbers: the trainer\'s own evaluation on data.validation at the step shown, '
              "over eval.max_batches micro-batches (not the whole set). The Evaluation section's held-out numbers come from "
              "evaluation.run over every example of its directory, after training. Groups are computed for every run (the "
              "curves show them); only SFT-GO optimises them.</p>")


def groups_table(runs: list[Run]) -> str:
    """Per run, the grouping behind each of its group numbers: the training curves, the trainer's held-out numbers,
    evaluation.run's held-out records (the diamonds and the Evaluation table), and whether lambda applies."""
    rows = []
    for run in runs:
        held = "; ".join(dict.fromkeys(heldout_groups(r) for r in (run.evaluation or {}).get("heldout", []))) or "—"
        rows.append([run.name, run.training_groups, run.trainer_eval_groups if run.evals else "—", held,
                     "yes" if run.lambda_applies else "not applicable"])
    return _table(["run", "training curves", "trainer held-out", "evaluation.run held-out (diamonds)", "lambda"], rows,
                  cls="data groups")


def sources_section(runs: list[Run], baselines: list[Baseline] | None = None, png: Path | None = None) -> str:
    """Per-source numbers, one row per (run, source): the training CE and group losses of the last logged window with
    the tokens trained (summed over the logged windows), then the held-out ones of the trainer's last evaluation and
    of evaluation.run's records; each group number's grouping named in its row."""
    train_rows = []
    for run in runs:
        keys = run.source_keys("source/", run.steps)
        for key in keys:
            logged = [r for r in run.steps if f"source/{key}/tokens" in r]
            last = next((r for r in reversed(logged) if f"source/{key}/ce" in r), {})
            train_rows.append([run.name, run.source_name(key, "train"), sum(r[f"source/{key}/tokens"] for r in logged),
                               last.get("step"), last.get(f"source/{key}/ce"), last.get(f"source/{key}/important_loss"),
                               last.get(f"source/{key}/unimportant_loss"), run.source_groups])
    held_rows = []
    for run in runs:
        final = run.evals[-1] if run.evals else {}
        for key in run.source_keys("eval_source/", run.evals[-1:]):
            held_rows.append([run.name, run.source_name(key, "validation"), f"trainer, step {final['step']}", run.trainer_eval_groups,
                              final.get(f"eval_source/{key}/ce"), final.get(f"eval_source/{key}/important_loss"),
                              final.get(f"eval_source/{key}/unimportant_loss"), final.get(f"eval_source/{key}/tokens")])
    evaluated = [Baseline(b.name, b.evaluation) for b in baselines or []]
    evaluated += [Baseline(run.name, run.evaluation) for run in runs if run.evaluation]
    for run in evaluated:
        for record in run.evaluation.get("heldout", []):
            for item in record.get("sources", []):
                held_rows.append([run.name, item.get("source"), f"evaluation.run, {record.get('dir')}", heldout_groups(record),
                                  item.get("ce"), item.get("important_loss"), item.get("unimportant_loss"), item.get("tokens")])
    if not train_rows and not held_rows:
        return ('<p class="note">No per-source numbers in these runs (they are logged by trainers since per-source losses '
                "exist, and by <code>evaluation.run</code> in its held-out records).</p>")
    parts = ['<p class="note">Per value of the shards\' <code>source</code> column. Training: the CE and group losses of '
             "the last logged window (train.log_every steps) and the trainable tokens of every logged window. Groups: "
             "the load-time grouping named in each row, for every loss (rho1 too: these are not its live selection); "
             "a group without tokens shows —.</p>"]
    if train_rows:
        parts.append(_table(["run", "source", "tokens trained", "last logged step", "training CE", "important", "unimportant",
                             "groups"], train_rows, cls="data sources-train"))
    if held_rows:
        parts.append(_table(["run", "source", "held-out numbers of", "groups", "held-out CE", "important", "unimportant",
                             "tokens"], held_rows, cls="data sources-heldout"))
    parts.append(_img(png, "CE per source"))
    return "".join(parts)


def lambda_note(runs: list[Run]) -> str:
    """Which runs the lambda plot leaves out, and why."""
    left = [run for run in runs if not run.lambda_applies]
    if not left:
        return ""
    why = {"rho1": "trains only its live selection", "sft": "plain CE", "select": "trains only the important group"}
    items = ", ".join(f"{html.escape(run.name)} ({html.escape(str(run.setting('loss.name')))}: "
                      f"{why.get(run.setting('loss.name'), 'no group weight')})" for run in left)
    return f'<p class="note lambda-na">lambda not applicable, not plotted: {items}.</p>'


@dataclass
class Baseline:
    """A model evaluated beside the runs but not trained by them (the base model): evaluation.run's record."""

    name: str
    evaluation: dict[str, Any]


def load_baselines(path: str | None, runs: list[Run]) -> list[Baseline]:
    """The runs of an evaluation JSON (``evaluation.run --output``, or one ``evaluation.json``) that are not
    among the report's run directories, as baselines."""
    if not path:
        return []
    try:
        saved = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ReportError(f"--baseline {path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise ReportError(f"--baseline {path}: not JSON ({exc.msg})") from None
    records = saved.get("runs", [saved]) if isinstance(saved, dict) else []
    models = {str((run.path / "model").resolve()) for run in runs}
    names = {run.name for run in runs}
    baselines = [Baseline(f"{r['run']} (baseline)", r) for r in records
                 if isinstance(r, dict) and "run" in r and r["run"] not in names and str(Path(str(r.get("model", ""))).resolve()) not in models]
    if not baselines:
        raise ReportError(f"--baseline {path}: no evaluated model other than the report's runs")
    return baselines


def evaluation_section(runs: list[Run], baselines: list[Baseline] | None = None) -> str:
    """evaluation.run's results across runs, baselines (the base model) first: benchmarks, per-group
    held-out loss, generations."""
    evaluated = [Baseline(b.name, b.evaluation) for b in baselines or []]
    evaluated += [Baseline(run.name, run.evaluation) for run in runs if run.evaluation]
    if not evaluated:
        return ('<p class="note">No <code>evaluation.json</code> in these runs; '
                '<code>python -m evaluation.run RUN_DIR ...</code> adds benchmarks, per-group held-out loss and generations here.</p>')
    parts = []
    bench_rows = []
    for run in evaluated:
        for record in run.evaluation.get("benchmarks", []):
            bench_rows.append([run.name, record.get("task"), record.get("split"), record.get("num_fewshot"), record.get("n"),
                               _pm(record.get("acc"), record.get("acc_stderr")), _pm(record.get("acc_norm"), record.get("acc_norm_stderr"))])
    if bench_rows:
        parts.append("<h3>Benchmarks</h3>" + _table(["run", "task", "split", "shots", "n", "acc ± stderr", "acc_norm ± stderr"], bench_rows))
    held_rows = []
    for run in evaluated:
        for record in run.evaluation.get("heldout", []):
            held_rows.append([run.name, record.get("dir"), heldout_groups(record), record.get("grouping_from", "—"),
                              record.get("ce"), record.get("important_loss"), record.get("unimportant_loss"),
                              record.get("worse_group"), record.get("tokens")])
    if held_rows:
        parts.append("<h3>Per-group held-out loss (evaluation.run: every example of the directory, final model)</h3>"
                     + _table(["run", "shards", "groups", "grouping from", "CE", "important", "unimportant", "worse group", "tokens"], held_rows))
    prompts: dict[str, dict[str, str]] = {}
    for run in evaluated:
        for item in run.evaluation.get("generations", []):
            prompts.setdefault(item.get("prompt", ""), {})[run.name] = item.get("answer", "")
    if prompts:
        blocks = []
        for prompt, answers in prompts.items():
            cells = "".join(f"<div><b>{html.escape(name)}</b><pre>{html.escape(text)}</pre></div>" for name, text in answers.items())
            blocks.append(f'<div class="gen-item"><p><b>Prompt:</b> {html.escape(prompt)}</p>'
                          f'<div class="gen" style="grid-template-columns: repeat({len(answers)}, 1fr)">{cells}</div></div>')
        parts.append('<h3>Sample generations (greedy)</h3><section class="generations">' + "".join(blocks) + "</section>")
    return "".join(parts)


def _pm(value: Any, stderr: Any) -> str:
    if value is None:
        return "—"
    return f"{value:.4f} ± {stderr:.4f}" if isinstance(stderr, (int, float)) else f"{value:.4f}"


# ---------------------------------------------------------------------------------------------
# Token viewer and scorer agreement over the runs' shards
# ---------------------------------------------------------------------------------------------


def _tokenizer_for(run: Run) -> Any:
    from data.models import load_tokenizer, resolve_model

    exported = run.path / "model"
    source = str(exported) if (exported / "tokenizer_config.json").is_file() else resolve_model(str(run.setting("model")))
    return load_tokenizer(source)


def shards_section(runs: list[Run], shards: str | None, examples: int, seed: int, out: Path,
                   agreement_examples: int) -> str:
    """Token viewer and scorer agreement for each distinct (shards, rho, scope) among the runs."""
    from data import shard_stats, viewer

    settings: dict[tuple[str, float, str], Run] = {}
    for run in runs:
        directory = shards or run.setting("data.validation") or run.setting("data.train")
        if not directory or run.setting("importance.rho") is None:
            continue
        key = (str(directory), float(run.setting("importance.rho")), str(run.setting("importance.scope", "sequence")))
        settings.setdefault(key, run)
    if not settings:
        return '<p class="note">The runs name no shards (data.validation / data.train); pass --shards DIR.</p>'
    parts = []
    for index, ((directory, rho, scope), run) in enumerate(settings.items()):
        if not Path(directory).exists() and "://" not in directory:
            parts.append(f'<p class="note">{html.escape(directory)}: not found here; pass --shards DIR to show its tokens.</p>')
            continue
        thresholds = shard_stats.corpus_thresholds(directory, rho) if scope == "corpus" else None
        sample = shard_stats.sample_examples(directory, n=examples, seed=seed)
        tokenizer = _tokenizer_for(run)
        title = f"{directory}: tokens at rho {rho}, scope {scope} (used by {', '.join(r.name for r in runs if r.setting('importance.rho') == rho)})"
        parts.append(viewer.token_viewer_html(sample, tokenizer, rho, scope=scope, thresholds=thresholds, title=title))
        agreement = shard_stats.scorer_agreement(directory, rho, max_examples=agreement_examples, scope=scope)
        png = plot_agreement(agreement, out / f"agreement_{index}.png")
        parts.append(f"<h3>Scorer agreement: {html.escape(directory)}</h3>" + viewer.agreement_html(agreement) + _img(png, "scorer agreement"))
    return "".join(parts)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def build_report(run_dirs: list[str], output: str, *, shards: str | None = None, examples: int = 6, seed: int = 0,
                 agreement_examples: int = 2000, title: str = "sftgo report", baseline: str | None = None) -> Path:
    """Write ``OUTPUT/report.html`` and its PNG plots for ``run_dirs``; returns the HTML path."""
    if not run_dirs:
        raise ReportError("no run directories given")
    paths = [Path(p) for p in run_dirs]
    runs = [load_run(path, name) for path, name in zip(paths, _unique_names(paths))]
    baselines = load_baselines(baseline, runs)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)

    loss_png = plot_loss_curves(runs, out / "loss_curves.png")
    lambda_png = plot_lambda(runs, out / "lambda.png")
    heldout_png = plot_heldout(runs, out / "heldout.png")
    sources_png = plot_source_curves(runs, out / "sources.png")
    sections = [
        f"<h1>{html.escape(title)}</h1>",
        '<p class="note">Runs: ' + ", ".join(f"<code>{html.escape(str(r.path))}</code>" for r in runs) + "</p>",
        "<h2>Runs</h2>", runs_table(runs),
        "<h2>Training loss by token group</h2>",
        ('<p class="note">CE over all trainable tokens (dashed), the important group and the unimportant group; '
         "SFT-GO optimises (1 - lambda) CE + lambda max(group losses). Diamonds after the last step: "
         "the final model's held-out losses from evaluation.run, when the run has them. Each panel names its groups; "
         "the table below says what \"important\" means in each number of this report.</p>"),
        groups_table(runs),
        _img(loss_png, "training loss curves"),
        "<h2>lambda over steps</h2>", lambda_note(runs), _img(lambda_png, "lambda over steps"),
        "<h2>Held-out loss</h2>",
        _img(heldout_png, "held-out losses") if heldout_png else '<p class="note">No held-out evaluation logged (data.validation, eval.every).</p>',
        "<h2>Per source</h2>", sources_section(runs, baselines, sources_png),
        "<h2>Evaluation</h2>", evaluation_section(runs, baselines),
        "<h2>Tokens and groups</h2>", shards_section(runs, shards, examples, seed, out, agreement_examples),
    ]
    page = ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>\n" + "\n".join(sections) + "\n</body></html>\n")
    report = out / "report.html"
    atomic_write_text(report, page)
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=program("python -m evaluation.report"),
        description="Write one self-contained HTML report (plus PNG plots) for training runs: loss curves by token "
                    "group, lambda, held-out losses, evaluation.run results, a token viewer and scorer agreement.",
        epilog="example: python -m evaluation.report runs/demo_sft runs/demo_sftgo --output runs/demo_report",
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="training run directories (config.yaml, metrics.jsonl)")
    parser.add_argument("--output", default="runs/report", help="folder for report.html and the PNG plots (default: %(default)s, beside the runs, ignored by git)")
    parser.add_argument("--shards", default=None,
                        help="annotated directory for the token viewer and scorer agreement (default: each run's data.validation, else data.train)")
    parser.add_argument("--examples", type=int, default=6, help="examples shown in the token viewer (default: 6)")
    parser.add_argument("--agreement-examples", type=int, default=2000,
                        help="examples read to measure scorer agreement (default: 2000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the token viewer's example sample (default: 0)")
    parser.add_argument("--baseline", default=None, metavar="EVALUATION_JSON",
                        help="evaluation.run output whose other models (the base model) are shown first, as baselines, in the Evaluation section (default: none)")
    parser.add_argument("--title", default="sftgo report", help="page title (default: sftgo report)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.examples < 0 or args.agreement_examples < 1:
        parser.error("--examples must be >= 0 and --agreement-examples >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = build_report(args.runs, args.output, shards=args.shards, examples=args.examples, seed=args.seed,
                              agreement_examples=args.agreement_examples, title=args.title, baseline=args.baseline)
    except (ValueError, OSError) as exc:  # ReportError and the shard readers' errors name the file
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"report: {report}")
    for png in sorted(report.parent.glob("*.png")):
        print(f"plot:   {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
