"""The known-truth study (issue 33): does SFT-GO learn the tokens that matter faster when we know which they are?

    python bench/study.py --config bench/study/known_truth.yaml           # the whole study, resumable
    python bench/study.py --config bench/study/known_truth.yaml --smoke   # 2 steps, 1 seed, a tiny corpus

bench/study.py hands a config with ``kind: known_truth`` to :func:`run_study`. Steps, each skipped when
its output is there (a killed study reruns with the same command; the trainer resumes a killed run):

1. the corpus (bench/known_truth.py, deterministic in ``corpus.seed``) under ``work``/data;
2. annotate train and held-out once with ``given`` (spans 1, ``given.default`` 0) and ``tfidf``, so every
   method and seed reads the same shards: the same seed gives the same data order in every method, and
   the differences between methods are paired by seed;
3. the overlap of each grouping's important tokens (``groupings``, on the train shards, the trainer's own
   rule from data/grouping.py) with the given spans: precision, recall, Jaccard;
4. every method x seed (``methods`` x ``seeds``; ``train`` keys shared, the method's own on top), then on
   the held-out split: greedy accuracy on the key tokens under teacher forcing (argmax of the model's
   prediction at each given-span token), mean loss of the key tokens and of the other trainable tokens,
   and the worst of the two; the base model too;
5. ``results``/study.json and report.md: each method against ``sft`` as the mean paired difference over
   seeds with a 95% t-interval, rewritten after each run.

Exported models are deleted once evaluated (``keep_models: false``): 20 runs x 0.5 GB otherwise.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if not __package__:  # run as a file: this checkout, not the file's folder, leads sys.path (tests/test_layers.py)
    sys.path[:] = [str(Path(__file__).resolve().parents[1])] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from bench.study import Study, StudyError, _f, read_config, save_figure, t_interval  # noqa: E402
from schemas.shard import MANIFEST_NAME, atomic_write_text  # noqa: E402

SCHEMA = "sftgo-known-truth-study/1"
REQUIRED = ("kind", "model", "results", "work", "corpus", "max_length", "train", "methods", "seeds", "groupings",
            "baseline", "evaluate")
OPTIONAL = ("keep_models",)
METRICS = ("key_accuracy", "key_loss", "other_loss", "worst_group_loss")
#: ``importance.rho: span`` (scope corpus): the rho whose corpus cut is exactly the given spans (:func:`span_rho`).
SPAN = "span"


def load_config(path: Path, smoke: bool, model: str | None, results: str | None, work: str | None,
                overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The known-truth study config (``overrides`` applied: bench/study.py's :func:`read_config`), checked;
    ``--smoke``: a tiny corpus, 2 steps a run, the first seed."""
    cfg = read_config(path, overrides)
    missing = [k for k in REQUIRED if k not in cfg]
    unknown = sorted(set(cfg) - set(REQUIRED) - set(OPTIONAL))
    if missing or unknown:
        raise StudyError(f"--config {path}: missing keys {missing}, unknown keys {unknown}")
    if cfg["baseline"] not in cfg["methods"]:
        raise StudyError(f"--config {path}: baseline {cfg['baseline']!r} is not one of methods {sorted(cfg['methods'])}")
    for name, overrides in cfg["methods"].items():
        if "seed" in overrides:
            raise StudyError(f"--config {path}: methods.{name} sets seed; seeds come from `seeds` (paired across methods)")
        rho = overrides.get("importance.rho")
        if isinstance(rho, str) and (rho != SPAN or overrides.get("importance.scope") != "corpus"):
            raise StudyError(f"--config {path}: methods.{name}: importance.rho {rho!r}: a number, or {SPAN!r} with importance.scope corpus")
    for scorer in cfg["groupings"]:
        if scorer not in ("given", "tfidf"):
            raise StudyError(f"--config {path}: groupings.{scorer}: the study annotates given and tfidf only")
    for key, value in (("model", model), ("results", results), ("work", work)):
        if value:
            cfg[key] = value
    if smoke:
        cfg["corpus"].update(entities=4, repeats=2, heldout_repeats=1)
        cfg["train"].update({"train.max_steps": 2, "checkpoint.every": 1})
        cfg["seeds"] = cfg["seeds"][:1]
        cfg["evaluate"] = {**cfg["evaluate"], "every": 1}
    cfg["smoke"] = smoke
    return cfg


class KnownTruthStudy(Study):
    """The known-truth study; reuses :class:`bench.study.Study`'s plumbing (logged steps, annotate, train)."""

    def __init__(self, cfg: dict[str, Any], config_path: Path) -> None:
        super().__init__(cfg, config_path)
        self.previous = None  # never reuse another study's records

    def runs(self) -> dict[str, dict[str, Any]]:
        """``{method}_s{seed}``: the method's train keys with the seed, in seed-major order (a partial
        study then has every method at its first seeds); ``importance.rho: span`` made a number."""
        out = {}
        for seed in self.cfg["seeds"]:
            for method, overrides in self.cfg["methods"].items():
                keys = {**overrides, "seed": seed}
                if keys.get("importance.rho") == SPAN:
                    keys["importance.rho"] = self.span_rho()
                out[f"{method}_s{seed}"] = keys
        return out

    def span_rho(self) -> float:
        """:func:`span_rho` of the train shards' given score."""
        manifest = json.loads((self.shards("train") / MANIFEST_NAME).read_text())
        return span_rho(manifest["score_stats"]["given"])

    def span_share(self) -> float:
        """The share of the train shards' trainable tokens inside a given span."""
        stats = json.loads((self.shards("train") / MANIFEST_NAME).read_text())["score_stats"]["given"]
        return stats["sum"] / stats["count"]

    def validation_keys(self) -> dict[str, Any]:
        """Train keys that evaluate the held-out split during training, grouped by the given spans: the
        trainer's ``eval_important_accuracy`` is then the held-out key-token accuracy at that step."""
        every = int(self.cfg["evaluate"].get("every", 0))
        if not every:
            return {}
        return {"data.validation": str(self.shards("heldout")), "eval.every": every, "eval.scorer": "given",
                "eval.rho": self.span_rho(), "eval.scope": "corpus"}

    def corpus(self) -> dict[str, Path]:
        from bench import known_truth

        c = self.cfg["corpus"]
        return known_truth.write(self.work / "data", int(c["seed"]), entities=int(c["entities"]), repeats=int(c["repeats"]),
                                 heldout_repeats=int(c["heldout_repeats"]))

    def annotate_split(self, name: str, corpus: Path) -> None:
        folder = self.shards(name)
        if all(self._has_scorer(folder, s) for s in ("given", "tfidf")):
            return
        self.sh(f"annotate_{name}", [sys.executable, "annotate/run.py", "--input", str(corpus), "--format", "messages",
                                     "--model", self.cfg["model"], "--max-length", str(self.cfg["max_length"]),
                                     "--scorers", "given,tfidf", "--scorer-option", "given.default=0",
                                     # The paper's TF-IDF (raw counts, smoothed IDF), whatever the installed default.
                                     "--scorer-option", "tfidf.sublinear_tf=false", "--output", str(folder)])

    # -- evaluation ---------------------------------------------------------------------------------

    def eval_settings(self, name: str, model: str) -> dict[str, Any]:
        """What a cached evaluation must match: the model, the held-out shards, and a run's train keys."""
        import hashlib

        manifest = hashlib.sha256((self.shards("heldout") / MANIFEST_NAME).read_bytes()).hexdigest()
        train = {**self.cfg["train"], **self.validation_keys(), **self.runs()[name]} if name != "base" else None
        return {"model": model, "heldout_manifest_sha256": manifest, "train": train}

    def cached(self, name: str, settings: dict[str, Any]) -> dict[str, Any] | None:
        out = self.work / "eval" / f"{name}.json"
        if out.exists():
            cached = json.loads(out.read_text())
            if cached.get("settings") == settings:
                return cached
        return None

    def evaluate(self, name: str, model: str) -> dict[str, Any]:
        """Held-out key-token accuracy and losses of ``model``, cached in work/eval."""
        settings = self.eval_settings(name, model)
        cached = self.cached(name, settings)
        if cached is not None:
            return cached
        started = time.time()
        result = {"settings": settings, "heldout": key_token_metrics(model, self.shards("heldout")),
                  "curve": read_eval_curve(self.run_dir(name)) if name != "base" else []}
        self.timings[f"heldout_{name}"] = time.time() - started
        atomic_write_text(self.work / "timings.json", json.dumps(self.timings, indent=2))
        atomic_write_text(self.work / "eval" / f"{name}.json", json.dumps(result, indent=2))
        return result

    def run(self) -> dict[str, Any]:
        from data.models import resolve_model

        corpora = self.corpus()
        self.annotate_split("train", corpora["train"])
        self.annotate_split("heldout", corpora["heldout"])
        overlap = grouping_overlap(self.shards("train"), self.cfg["groupings"])
        evaluations = {"base": self.evaluate("base", resolve_model(self.cfg["model"]))}
        self.write_results(evaluations, overlap)
        for name, overrides in self.runs().items():
            model = str(self.run_dir(name) / "model")
            cached = self.cached(name, self.eval_settings(name, model))
            if cached is None:  # (a cached one needs no model: keep_models false deletes it)
                run = self.train(name, self.shards("train"), {**self.cfg["train"], **self.validation_keys(), **overrides})
                cached = self.evaluate(name, model)
                shutil.rmtree(run / "checkpoints", ignore_errors=True)
                if not self.cfg.get("keep_models", False):
                    shutil.rmtree(run / "model", ignore_errors=True)
            evaluations[name] = cached
            self.write_results(evaluations, overlap)
        return self.write_results(evaluations, overlap, final=True)

    def write_results(self, evaluations: dict[str, Any], overlap: dict[str, Any], final: bool = False) -> dict[str, Any]:
        runs = self.runs()
        results = {
            "schema": SCHEMA, "complete": final, "config": {k: v for k, v in self.cfg.items()},
            "config_file": str(self.config_path), "table": json.loads((self.work / "data" / "table.json").read_text()),
            "data_totals": {s: json.loads((self.shards(s) / MANIFEST_NAME).read_text())["totals"] for s in ("train", "heldout")},
            "grouping_overlap_with_given_spans": overlap,
            "runs": {name: {"overrides": runs.get(name, {}), **ev["heldout"], "curve": ev.get("curve", []),
                            "train_summary": _train_summary(self.run_dir(name))} for name, ev in evaluations.items()},
            "span_share": self.span_share(),
            "vs_baseline": paired_differences(evaluations, self.cfg), "step_seconds": self.timings,
            "generated_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        atomic_write_text(self.results / "study.json", json.dumps(results, indent=2) + "\n")
        write_report(self, results)
        print(f"[study] wrote {self.results / 'study.json'} and report.md ({len(evaluations) - 1} of {len(runs)} runs)", flush=True)
        return results


def span_rho(summary: dict[str, Any]) -> float:
    """The rho whose corpus cut (data.grouping.corpus_cut) marks exactly the tokens of the given spans.

    Given scores are 0 outside the spans and 1 inside: a point mass at each value. At a rho whose
    quantile is 0 or 1 the cut would pick a share 1 - rho of the tied tokens by their tie keys (some
    span tokens, or some others); between the sketch's last 0 point and its first 1 point the
    interpolated threshold lies strictly between 0 and 1, nothing is tied, and important = score > t
    = the spans, whatever their exact share.
    """
    quantiles = summary["quantiles"]
    top = max(quantiles)
    first = quantiles.index(top)
    if first == 0 or min(quantiles) == top:
        raise StudyError("the given score has one value: no span to group by")
    return (first - 0.5) / (len(quantiles) - 1)


def read_eval_curve(run: Path) -> list[dict[str, float]]:
    """The run's in-training held-out evaluations (metrics.jsonl): step, key accuracy and the group losses."""
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if "eval_important_accuracy" in record:
            out.append({"step": record["step"], "key_accuracy": record["eval_important_accuracy"],
                        "key_loss": record["eval_important_loss"], "other_loss": record["eval_unimportant_loss"]})
    return out


def _train_summary(run: Path) -> dict[str, Any] | None:
    path = run / "train_summary.json"
    if not path.exists():
        return None
    summary = json.loads(path.read_text())
    return {k: summary[k] for k in ("steps", "tokens", "seconds", "epochs") if k in summary}


# ---------------------------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------------------------


def _rows(folder: Path, columns: list[str]) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    out: list[dict[str, Any]] = []
    for path in sorted(folder.glob("shard-*.parquet")):
        out.extend(pq.read_table(path, columns=columns).to_pylist())
    return out


def key_token_metrics(model_path: str, heldout: Path) -> dict[str, Any]:
    """Teacher-forced held-out metrics: key tokens are the trainable tokens with a given score > 0.

    key_accuracy: fraction of key tokens whose greedy prediction (argmax of the logits at the position
    before) is the token; key_loss / other_loss: mean CE of the key / the other trainable tokens;
    worst_group_loss: the larger of the two (SFT-GO's objective looks at exactly this). One example per
    forward pass (no padding or packing to get wrong); fp32 on CPU.
    """
    import torch

    from evaluation.run import load_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(model_path, device)
    hits = keys = 0
    key_sum = other_sum = 0.0
    others = 0
    with torch.no_grad():
        for row in _rows(heldout, ["input_ids", "loss_mask", "score_given"]):
            ids = torch.tensor(row["input_ids"], dtype=torch.long, device=device)
            logits = model(input_ids=ids[None]).logits[0, :-1].float()
            target = ids[1:]
            loss = torch.nn.functional.cross_entropy(logits, target, reduction="none").double().cpu()
            mask = torch.tensor(row["loss_mask"][1:])
            key = mask & (torch.tensor(row["score_given"][1:]) > 0)
            other = mask & ~key
            hits += int((logits.argmax(-1).cpu() == target.cpu())[key].sum())
            keys += int(key.sum())
            key_sum += float(loss[key].sum())
            other_sum += float(loss[other].sum())
            others += int(other.sum())
    if not keys:
        raise StudyError(f"{heldout}: no key tokens (score_given > 0) among the trainable tokens")
    key_loss, other_loss = key_sum / keys, other_sum / max(others, 1)
    return {"key_accuracy": hits / keys, "key_loss": key_loss, "other_loss": other_loss,
            "worst_group_loss": max(key_loss, other_loss), "worse_group": "key" if key_loss >= other_loss else "other",
            "key_tokens": keys, "other_tokens": others}


def grouping_overlap(train: Path, groupings: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each grouping's important tokens on the train shards, by the trainer's own rule (data/grouping.py:
    the corpus cut with its tie keys, or the per-example top share), against the given spans."""
    import torch

    from data.grouping import important_mask_packed, manifest_corpus_cut
    from schemas.shard import Manifest

    manifest = Manifest.load(train)
    manifest_data = json.loads((train / MANIFEST_NAME).read_text())
    out = {}
    for scorer, spec in groupings.items():
        scope = spec.get("scope", "sequence")
        rho = span_rho(manifest_data["score_stats"]["given"]) if spec["rho"] == SPAN else float(spec["rho"])
        cut = manifest_corpus_cut(manifest, scorer, rho) if scope == "corpus" else None
        both = important = spans = trainable = 0
        for row in _rows(train, ["id", "loss_mask", "score_given", f"score_{scorer}"]):
            mask = torch.tensor(row["loss_mask"])
            score = torch.tensor(row[f"score_{scorer}"], dtype=torch.float32)
            imp = important_mask_packed(score, mask, [len(row["loss_mask"])], rho, scope, threshold=cut, ids=[row["id"]])
            key = mask & (torch.tensor(row["score_given"]) > 0)
            both += int((imp & key).sum())
            important += int(imp.sum())
            spans += int(key.sum())
            trainable += int(mask.sum())
        out[scorer] = {"rho": rho, "scope": scope, "threshold": None if cut is None else cut.threshold,
                       "trainable_tokens": trainable, "important_tokens": important, "span_tokens": spans, "both": both,
                       "precision": both / important if important else None, "recall": both / spans if spans else None,
                       "jaccard": both / (important + spans - both) if important + spans - both else None}
    return out


def paired_differences(evaluations: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    """Per method and metric: method minus baseline, paired by seed, over the seeds both have finished."""
    base = cfg["baseline"]
    out: dict[str, Any] = {}
    for method in cfg["methods"]:
        if method == base:
            continue
        seeds = [s for s in cfg["seeds"] if f"{method}_s{s}" in evaluations and f"{base}_s{s}" in evaluations]
        if not seeds:
            continue
        out[method] = {"seeds": seeds}
        for metric in METRICS:
            diffs = [evaluations[f"{method}_s{s}"]["heldout"][metric] - evaluations[f"{base}_s{s}"]["heldout"][metric] for s in seeds]
            out[method][metric] = t_interval(diffs)
    return out


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


def plot_key_accuracy(results: dict[str, Any], path: Path) -> bool:
    """Held-out key-token accuracy per step, one line per method (mean over its finished seeds) with a
    band from the lowest to the highest seed; step 0 is the base model. False when no run has a curve."""
    cfg = results["config"]
    base = results["runs"].get("base", {}).get("key_accuracy")
    curves: dict[str, list[list[dict[str, float]]]] = {}
    for method in cfg["methods"]:
        for seed in cfg["seeds"]:
            curve = results["runs"].get(f"{method}_s{seed}", {}).get("curve")
            if curve:
                curves.setdefault(method, []).append(curve)
    if not curves:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for method, runs in curves.items():
        steps = sorted(set.intersection(*({c["step"] for c in run} for run in runs)))
        values = [[next(c["key_accuracy"] for c in run if c["step"] == step) for run in runs] for step in steps]
        if base is not None:
            steps, values = [0, *steps], [[base] * len(runs), *values]
        line = ax.plot(steps, [statistics.fmean(v) for v in values], label=f"{method} ({len(runs)} seeds)")[0]
        if len(runs) > 1:
            ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], color=line.get_color(), alpha=0.2)
    ax.axhline(results["table"]["chance_accuracy"], color="grey", linestyle=":", linewidth=1, label="chance")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("held-out key-token accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("Known-truth study: mean over seeds, band = min..max", fontsize=9)
    save_figure(fig, path)
    return True


def write_report(study: KnownTruthStudy, results: dict[str, Any]) -> None:
    cfg = results["config"]
    table = results["table"]
    lines = [f"# Known-truth study: `{study.config_path.name}`{' (smoke)' if cfg.get('smoke') else ''}", "",
             f"Generated {results['generated_at']}. " + ("All runs finished." if results["complete"] else
                                                         f"**In progress**: {len(results['runs']) - 1} of {len(study.runs())} runs evaluated."), "",
             "## Setup", "",
             f"- Model `{cfg['model']}`; corpus bench/known_truth.py {json.dumps(cfg['corpus'])}: a secret table of "
             f"{len(table['table'])} made-up names -> banner colour; one key token (the colour) per answer, the rest boilerplate; "
             f"held-out: the same facts in unseen phrasings. Chance accuracy {table['chance_accuracy']:.3f}.",
             f"- Data: {json.dumps(results['data_totals'])}",
             f"- Shared train keys: `{json.dumps(cfg['train'])}`; seeds {cfg['seeds']} (the same data order for every method of a seed).",
             "- Methods: " + "; ".join(f"**{m}** `{json.dumps(o)}`" for m, o in cfg["methods"].items()), "",
             "## Important groups against the given spans (train shards)", "",
             "| grouping | rho | scope | important tokens | span tokens | both | precision | recall | Jaccard |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for scorer, o in results["grouping_overlap_with_given_spans"].items():
        lines.append(f"| {scorer} | {o['rho']} | {o['scope']} | {o['important_tokens']} | {o['span_tokens']} | {o['both']} | "
                     f"{_f(o['precision'], 3)} | {_f(o['recall'], 3)} | {_f(o['jaccard'], 3)} |")
    lines += ["", "## Held-out (teacher forcing)", "",
              "| run | key accuracy | key loss | other loss | worst group (which) | steps |", "|---|---:|---:|---:|---|---:|"]
    for name, run in results["runs"].items():
        steps = (run.get("train_summary") or {}).get("steps", "-")
        lines.append(f"| {name} | {_f(run['key_accuracy'], 3)} | {_f(run['key_loss'])} | {_f(run['other_loss'])} | "
                     f"{_f(run['worst_group_loss'])} ({run['worse_group']}) | {steps} |")
    lines += ["", f"## Against {cfg['baseline']} (mean paired difference over seeds, 95% t-interval)", "",
              "| method | seeds | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    for method, row in results["vs_baseline"].items():
        cells = []
        for metric in METRICS:
            x = row[metric]
            cells.append(f"{x['mean']:+.4f}" + ("" if x["low"] is None else f" [{x['low']:+.4f}, {x['high']:+.4f}]"))
        lines.append(f"| {method} | {len(row['seeds'])} | " + " | ".join(cells) + " |")
    lines += ["", "Higher key accuracy is better; lower losses are better. An interval that excludes 0 is a difference "
              "beyond seed noise at 95% (t over the paired seed differences).", ""]
    if plot_key_accuracy(results, study.results / "key_accuracy.png"):
        lines += ["## Held-out key-token accuracy per step", "", "![key accuracy](key_accuracy.png)", "",
                  "The trainer's in-training evaluation of the held-out split (`eval.scorer given`, the span cut): "
                  "`eval_important_accuracy` = greedy accuracy on the key tokens under teacher forcing, packed as in "
                  "training; the table above is a separate pass over the final models, one example per forward.", ""]
    lines += [f"Given spans: {results['span_share']:.4f} of the train shards' trainable tokens.", "",
              "## Time", "", "| step | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in results["step_seconds"].items()]
    lines.append(f"| total | {sum(results['step_seconds'].values()):.0f} |")
    atomic_write_text(study.results / "report.md", "\n".join(lines) + "\n")


def run_study(config_path: Path, smoke: bool, model: str | None, results: str | None, work: str | None,
              overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Load, check and run the known-truth study (bench/study.py's entry point for ``kind: known_truth``)."""
    cfg = load_config(config_path, smoke, model, results, work, overrides)
    return KnownTruthStudy(cfg, config_path).run()
