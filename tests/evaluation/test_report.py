"""evaluation.report: the HTML page and its plots, checked as data and rendered in headless Chromium."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.train.conftest import make_examples, write_annotated_dir
from train import config as train_config
from evaluation import report

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def write_run(path: Path, *, loss: str, shards: Path, model: Path, steps: int = 6, resumed: bool = False,
              evaluation: dict | None = None) -> Path:
    """A run directory as train/main.py leaves it: resolved config.yaml, metrics.jsonl (+ evaluation.json)."""
    cfg = train_config.load_config([f"model={model}", f"output_dir={path}", f"data.train={shards}", f"data.validation={shards}",
                                    f"loss.name={loss}", "importance.scorer=tfidf", "importance.rho=0.7"])
    train_config.save_config(cfg, path / "config.yaml")
    lines = []
    for step in range(1, steps + 1):
        lam = 0.0 if loss == "sft" else 0.9
        imp, unimp = 3.0 - 0.1 * step, 2.0 - 0.05 * step
        lines.append({"step": step, "loss": (1 - lam) * 2.5 + lam * max(imp, unimp), "ce": 2.5 - 0.07 * step,
                      "important_loss": imp, "unimportant_loss": unimp, "lambda": lam, "worse_group": 1.0, "lr": 1e-5})
        if step % 3 == 0:
            lines.append({**lines[-1], "eval_ce": 2.6 - 0.05 * step, "eval_important_loss": 3.1 - 0.05 * step,
                          "eval_unimportant_loss": 2.1 - 0.02 * step, "eval_worse_group": 1, "eval_tokens": 100})
    if resumed:  # a kill after step 4's checkpoint: steps 5-6 logged twice, the later value must win
        lines.insert(5, {**lines[5], "ce": 99.0})
    with open(path / "metrics.jsonl", "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(line) + "\n" for line in lines))
    if evaluation is not None:
        (path / "evaluation.json").write_text(json.dumps(evaluation))
    return path


@pytest.fixture(scope="module")
def report_inputs(tmp_path_factory, smol_tokenizer, smol_tokenizer_dir):
    root = tmp_path_factory.mktemp("report")
    examples = make_examples(12, scorers=["tfidf", "base_loss", "ref_loss"], seed=3, min_len=6, max_len=30)
    # Real SmolLM2 token ids that decode to markup: the page must show it as text, never run it.
    markup = smol_tokenizer("<script>window.__xss = 1</script> & <b>", add_special_tokens=False)["input_ids"]
    ids = markup + [int(x) for x in examples[0]["input_ids"]]
    examples[0] = {"id": "markup", "input_ids": ids, "loss_mask": [i > 0 for i in range(len(ids))],
                   "scores": {k: [float(i % 7) for i in range(len(ids))] for k in ("tfidf", "base_loss", "ref_loss")}}
    shards = root / "shards"
    write_annotated_dir(shards, examples, ["tfidf", "base_loss", "ref_loss"], rows_per_shard=5)
    evaluation = lambda run: {  # noqa: E731 - a tiny record factory
        "run": run, "model": f"{run}/model",
        "benchmarks": [{"task": "arc_challenge", "split": "dev", "num_fewshot": 0, "n": 4, "acc": 0.25, "acc_stderr": 0.25,
                        "acc_norm": 0.5, "acc_norm_stderr": 0.2887}],
        "heldout": [{"dir": str(shards), "scorer": "tfidf", "rho": 0.7, "scope": "sequence", "ce": 2.0,
                     "important_loss": 2.5, "unimportant_loss": 1.8, "worse_group": "important", "tokens": 50}],
        "generations": [{"prompt": "Name a colour.", "answer": f"answer of {run} <i>not markup</i>"}],
    }
    sft = write_run(root / "sft", loss="sft", shards=shards, model=smol_tokenizer_dir, evaluation=evaluation("sft"))
    sftgo = write_run(root / "sftgo", loss="sftgo", shards=shards, model=smol_tokenizer_dir, resumed=True, evaluation=evaluation("sftgo"))
    out = root / "out"
    html_path = report.build_report([str(sft), str(sftgo)], str(out), examples=12)  # every example, the markup one too
    return {"root": root, "shards": shards, "sft": sft, "sftgo": sftgo, "out": out, "html": html_path}


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def test_report_files_and_content(report_inputs):
    out, page = report_inputs["out"], report_inputs["html"].read_text(encoding="utf-8")
    for name in ("loss_curves.png", "lambda.png", "heldout.png", "agreement_0.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000, name
    collector = _Collector()
    collector.feed(page)
    images = [attrs for tag, attrs in collector.tags if tag == "img"]
    assert len(images) == 4 and all(a["src"].startswith("data:image/png;base64,") for a in images)  # self-contained
    assert not [a for t, a in collector.tags if t in ("script", "link") and (a.get("src") or a.get("href"))]  # nothing external
    assert "<script>window.__xss" not in page and "&lt;i&gt;not markup&lt;/i&gt;" in page
    # Benchmarks, per-group held-out loss and generations of both runs.
    assert page.count("0.2500 ± 0.2500") == 2 and "answer of sft" in page and "answer of sftgo" in page
    assert "token-viewer" in page and "agreement" in page


def test_report_reads_metrics_like_the_trainer_wrote_them(report_inputs):
    run = report.load_run(report_inputs["sftgo"])
    assert [r["step"] for r in run.steps] == [1, 2, 3, 4, 5, 6]
    assert all(r["ce"] != 99.0 for r in run.steps)  # the re-logged (later) line wins after a resume
    assert [e["step"] for e in run.evals] == [3, 6]
    assert math.isclose(run.evals[-1]["eval_ce"], 2.6 - 0.3)
    assert run.setting("importance.rho") == 0.7 and run.setting("loss.name") == "sftgo"


def test_report_bad_input_names_the_file(tmp_path, report_inputs, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(report_inputs["sft"], broken)
    with open(broken / "metrics.jsonl", "a") as f:
        f.write("{not json\n")
        f.write(json.dumps({"step": 7, "loss": 1.0}) + "\n")
    assert report.main([str(broken), "--output", str(tmp_path / "o")]) == 2
    assert f"{broken / 'metrics.jsonl'}:" in capsys.readouterr().err
    assert report.main([str(tmp_path / "missing"), "--output", str(tmp_path / "o")]) == 2
    assert "missing: not a directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert report.main([str(tmp_path / "empty"), "--output", str(tmp_path / "o")]) == 2
    assert "config.yaml: missing" in capsys.readouterr().err


def test_report_cli_help_and_run(report_inputs, tmp_path):
    result = subprocess.run([sys.executable, "-m", "evaluation.report", str(report_inputs["sft"]), "--output", str(tmp_path / "r"),
                             "--examples", "2"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"report: {tmp_path / 'r' / 'report.html'}" in result.stdout
    assert (tmp_path / "r" / "loss_curves.png").is_file()


def _chromium():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1300,2000"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def test_report_renders_in_headless_chromium(report_inputs):
    assert Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists(), (
        "Debian's chromium and chromium-driver are needed (make setup installs them)")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    driver = _chromium()
    try:
        driver.get(report_inputs["html"].as_uri())
        assert driver.title == "sftgo report"
        images = driver.find_elements(By.CSS_SELECTOR, "img.plot")
        assert len(images) == 4
        for image in images:  # decoded and laid out: a broken data URI has naturalWidth 0
            assert driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image) > 200
            assert image.size["width"] > 100 and image.size["height"] > 100
        tokens = driver.find_elements(By.CSS_SELECTOR, "section.token-viewer span.tok")
        assert len(tokens) > 20 and all(t.is_displayed() for t in tokens[:5])
        assert driver.execute_script("return window.__xss") is None  # the markup token stayed text
        important = driver.find_elements(By.CSS_SELECTOR, "section.token-viewer span.tok[data-group-tfidf='1']")
        assert important, "no token marked important at rho"
        # Shading follows the chosen score: switching the selector repaints the tokens.
        select = Select(driver.find_element(By.CSS_SELECTOR, "section.token-viewer select.score-select"))
        names = [o.get_attribute("value") for o in select.options]
        assert {"tfidf", "base_loss", "ref_loss", "excess_loss"} <= set(names)
        shading = lambda: [t.value_of_css_property("background-color") for t in tokens[:40]]  # noqa: E731
        before = shading()
        select.select_by_value("excess_loss" if names[0] != "excess_loss" else "tfidf")
        assert shading() != before
        table = driver.find_element(By.CSS_SELECTOR, "table.agreement")
        assert table.is_displayed() and "excess_loss" in table.text
        assert driver.find_element(By.CSS_SELECTOR, "section.generations").is_displayed()
        driver.save_screenshot(str(report_inputs["out"] / "screenshot.png"))
    finally:
        driver.quit()


def test_agreement_plot_leaves_unmeasured_pairs_blank(tmp_path):
    agreement = {"scores": ["tfidf", "ref_loss"], "overlap": [[1.0, None], [None, 1.0]], "rho": 0.7}
    png = report.plot_agreement(agreement, tmp_path / "a.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert report.plot_agreement({"scores": ["tfidf"], "overlap": [[1.0]], "rho": 0.7}, tmp_path / "b.png") is None


LOSSES_6 = [("sft", {}), ("sftgo", {}), ("rho1", {"loss.rho1_rho": "0.55"}), ("infosft", {}), ("dft", {}),
            ("sftgo", {"loss.lambda_schedule": "linear"})]


def six_run_report(root: Path, shards: Path, model: Path) -> tuple[Path, list[Path]]:
    evaluation = lambda run: {  # noqa: E731
        "run": run, "model": str(root / run / "model"),
        "benchmarks": [{"task": "mmlu", "split": "val", "num_fewshot": 0, "n": 57, "acc": 0.25, "acc_stderr": 0.05}],
        "heldout": [{"dir": str(shards), "scorer": "tfidf", "rho": 0.7, "scope": "sequence", "ce": 2.0,
                     "important_loss": 2.5, "unimportant_loss": 1.8, "worse_group": "important", "tokens": 50}],
        "generations": [{"prompt": "What is the capital of France?", "answer": f"Paris, says {run}."}]}
    runs = []
    for index, (loss, extra) in enumerate(LOSSES_6):
        name = f"run{index}_{loss}"
        path = write_run(root / name, loss=loss, shards=shards, model=model, steps=2 if index == 0 else 6, evaluation=evaluation(name))
        if extra:  # the loss's own settings, as train/main.py would have saved them
            cfg = train_config.load_config(["--config", str(path / "config.yaml"), *[f"{k}={v}" for k, v in extra.items()]])
            train_config.save_config(cfg, path / "config.yaml")
        runs.append(path)
    baseline = root / "evaluation.json"
    baseline.write_text(json.dumps({"runs": [{**evaluation("smollm2-135m-instruct"), "model": "/models/base"}]
                                    + [evaluation(p.name) for p in runs]}))
    return baseline, runs


def test_six_runs_objectives_baseline_and_plots_without_overlaps(tmp_path, report_inputs, smol_tokenizer_dir, capsys):
    baseline, runs = six_run_report(tmp_path, report_inputs["shards"], smol_tokenizer_dir)
    html_path = report.build_report([str(p) for p in runs], str(tmp_path / "out"), examples=2, baseline=str(baseline))
    assert "overlaps" not in capsys.readouterr().err  # _save warns about any two text boxes that overlap
    page = html_path.read_text()
    assert "<td>CE over every trainable token</td>" in page  # sft: no lambda
    assert "(1 − λ)·CE + λ·(worse group&#x27;s mean loss), λ = 0.9 (static)" in page
    assert "λ linear 0.9 → 0.05" in page and "CE over the top 45% of tokens by excess loss (rho1 rho 0.55)" in page
    assert "trainer held-out CE" in page and "evaluation.run: every example of the directory, final model" in page
    # The base model leads each evaluation table and the generations.
    evaluation = page[page.index("<h2>Evaluation</h2>"):]
    assert evaluation.index("smollm2-135m-instruct (baseline)") < evaluation.index("run0_sft</td>")
    assert page.count("(baseline)") >= 3


def test_six_run_report_text_does_not_overlap_in_chromium(tmp_path, report_inputs, smol_tokenizer_dir):
    from selenium.webdriver.common.by import By

    baseline, runs = six_run_report(tmp_path, report_inputs["shards"], smol_tokenizer_dir)
    html_path = report.build_report([str(p) for p in runs], str(tmp_path / "out"), examples=2, baseline=str(baseline))
    driver = _chromium()
    try:
        driver.get(html_path.as_uri())
        assert len(driver.find_elements(By.CSS_SELECTOR, "img.plot")) == 4
        shown = driver.execute_script("""
            return [...document.querySelectorAll('h1,h2,h3,p,th,td,figcaption,pre,b,code,img.plot')]
              .filter(e => { const r = e.getBoundingClientRect(); return r.width > 0 && r.height > 0; }).length;
        """)
        nested = driver.execute_script("""
            const els = [...document.querySelectorAll('h1,h2,h3,p,th,td,figcaption,pre,b,code,img.plot')].filter(e => !e.closest('section.token-viewer'))
              .filter(e => { const r = e.getBoundingClientRect(); return r.width > 0 && r.height > 0; });
            const pairs = [];
            for (let i = 0; i < els.length; i++) for (let j = i + 1; j < els.length; j++) {
              if (els[i].contains(els[j]) || els[j].contains(els[i])) continue;  // a <b> inside its <td>
              // getClientRects: an inline element wrapped over two lines is two boxes, not their union.
              const hit = [...els[i].getClientRects()].some(a => [...els[j].getClientRects()].some(b =>
                a.left < b.right - 1 && b.left < a.right - 1 && a.top < b.bottom - 1 && b.top < a.bottom - 1));
              if (hit)
                pairs.push([els[i].tagName + ':' + (els[i].innerText || '').slice(0, 30), els[j].tagName + ':' + (els[j].innerText || '').slice(0, 30)]);
            }
            return pairs;
        """)
        assert shown > 50
        assert nested == []
    finally:
        driver.quit()


def test_run_labels_name_what_decides_each_objective():
    from pathlib import Path

    from evaluation.report import Run

    def label(**loss):
        config = {"loss": loss, "importance": {"scorer": "tfidf", "rho": 0.7}}
        return Run("r", Path("r"), config, [], []).label

    assert label(name="sft") == "r (sft)"
    assert label(name="sftgo") == "r (sftgo, tfidf, rho 0.7)"
    assert label(name="select") == "r (select, tfidf, rho 0.7)"
    assert label(name="weighted", weight_transform="sigmoid") == "r (weighted, tfidf, sigmoid)"


def test_a_lora_run_says_it_trained_adapters_of_its_base():
    from evaluation.report import Run, runs_table

    steps = [{"step": 1, "loss": 2.0, "ce": 2.0}]
    full = Run("full", Path("full"), {"model": "m", "loss": {"name": "sft"}}, steps, [])
    lora = Run("lora", Path("lora"), {"model": "m", "loss": {"name": "sft"}, "lora": {"rank": 8, "alpha": None,
                                                                                     "target_modules": ["q_proj", "v_proj"]}}, steps, [])
    assert full.weights_trained == "full weights"
    assert lora.weights_trained == "LoRA adapters: rank 8, alpha 16 on q_proj,v_proj, of base m (frozen)"
    table = runs_table([full, lora])
    assert table.count("LoRA adapters") == 1 and "full weights" not in table


def test_rho1_and_sftgo_report_names_every_grouping_in_chromium(tmp_path, report_inputs, smol_tokenizer_dir):
    """One meaning of "important" per number: a rho1 run's curves are its live selection, its trainer held-out
    numbers the config's score, evaluation.run's the record's grouping; lambda is not applicable to rho1."""
    from selenium.webdriver.common.by import By

    shards = report_inputs["shards"]
    held = lambda run, scorer: {"run": run, "model": f"{run}/model", "benchmarks": [], "generations": [],  # noqa: E731
                                "heldout": [{"dir": str(shards), "scorer": scorer, "rho": 0.7, "scope": "sequence",
                                             "grouping_from": "its config", "ce": 2.0, "important_loss": 2.5,
                                             "unimportant_loss": 1.8, "worse_group": "important", "tokens": 50}]}
    rho1 = write_run(tmp_path / "rho1", loss="rho1", shards=shards, model=smol_tokenizer_dir, steps=4,
                     evaluation=held("rho1", "excess_loss"))
    sftgo = write_run(tmp_path / "sftgo", loss="sftgo", shards=shards, model=smol_tokenizer_dir, steps=4,
                      evaluation=held("sftgo", "tfidf"))
    page = report.build_report([str(rho1), str(sftgo)], str(tmp_path / "out"), examples=2)
    driver = _chromium()
    try:
        driver.get(page.as_uri())
        rows = {row.find_elements(By.TAG_NAME, "td")[0].text: [td.text for td in row.find_elements(By.TAG_NAME, "td")]
                for row in driver.find_elements(By.CSS_SELECTOR, "table.groups tbody tr")}
        assert rows["rho1"][1:] == ["Rho-1 live selection (top 30% by live excess loss, per step)",
                                    "score tfidf, rho 0.7, sequence scope", "score excess_loss, rho 0.7, sequence scope",
                                    "not applicable"]
        assert rows["sftgo"][1:] == ["score tfidf, rho 0.7, sequence scope"] * 3 + ["yes"]
        note = driver.find_element(By.CSS_SELECTOR, "p.lambda-na")
        assert note.is_displayed() and "rho1 (rho1: trains only its live selection)" in note.text and "sftgo" not in note.text
        runs_header = [th.text for th in driver.find_elements(By.CSS_SELECTOR, "table.data")[0].find_elements(By.TAG_NAME, "th")]
        assert "training-curve groups" in runs_header and "trainer held-out groups" in runs_header
        body = driver.find_element(By.TAG_NAME, "body").text
        assert "score excess_loss, rho 0.7, sequence scope" in body and "its config" in body
    finally:
        driver.quit()
    assert [run.label for run in map(report.load_run, (rho1, sftgo))]  # both readable


class _TableRows(HTMLParser):
    """The cell texts of each body row of the table whose class list holds ``cls``."""

    def __init__(self, cls: str) -> None:
        super().__init__()
        self.cls, self.inside, self.rows, self.cell = cls, False, [], None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.inside = self.cls in dict(attrs).get("class", "").split()
        elif self.inside and tag == "tr":
            self.rows.append([])
        elif self.inside and tag == "td":
            self.cell = ""

    def handle_endtag(self, tag):
        if tag == "table":
            self.inside = False
        elif self.inside and tag == "td":
            self.rows[-1].append(self.cell)
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data


def table_rows(page: str, cls: str) -> list[list[str]]:
    parser = _TableRows(cls)
    parser.feed(page)
    return [row for row in parser.rows if row]


def test_per_source_tables_and_curves(tmp_path, report_inputs, smol_tokenizer_dir):
    """Per source: the last logged training window's CE and group losses with the tokens of every window, the trainer's
    last held-out numbers and evaluation.run's, each row naming its groups; names shown as text (markup escaped),
    through train_summary.json's key -> name map; a CE-per-source plot."""
    shards = report_inputs["shards"]
    held = {"run": "sftgo", "model": "sftgo/model", "benchmarks": [], "generations": [],
            "heldout": [{"dir": str(shards), "scorer": "ref_loss", "rho": 0.5, "scope": "sequence", "ce": 2.0,
                         "important_loss": 2.5, "unimportant_loss": 1.8, "worse_group": "important", "tokens": 50,
                         "sources": [{"source": "lima", "tokens": 30, "ce": 1.9, "accuracy": 0.1, "important_tokens": 15,
                                      "important_loss": 2.4, "unimportant_loss": 1.4},
                                     {"source": "web/<i>x</i>", "tokens": 20, "ce": 2.15, "accuracy": 0.2,
                                      "important_tokens": 0, "unimportant_loss": 2.15}]}]}
    run = write_run(tmp_path / "sftgo", loss="sftgo", shards=shards, model=smol_tokenizer_dir, steps=4, evaluation=held)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for record in lines:  # log_every 2: windows end at steps 2 and 4; the evaluation of step 3
        if "eval_ce" in record:
            record.update({"eval_source/lima/ce": 2.2, "eval_source/lima/tokens": 60, "eval_source/lima/important_loss": 2.9,
                           "eval_source/lima/unimportant_loss": 1.9, "eval_source/web_i_x_i/ce": 2.4,
                           "eval_source/web_i_x_i/tokens": 40})
        elif record["step"] % 2 == 0:
            s = record["step"]
            record.update({"source/lima/tokens": 100 + s, "source/lima/ce": 2.0 - 0.1 * s, "source/lima/important_loss": 3.0,
                           "source/lima/unimportant_loss": 1.5 - 0.1 * s, "source/web_i_x_i/tokens": 7, "source/web_i_x_i/ce": 2.5})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    names = {"lima": "lima", "web_i_x_i": "web/<i>x</i>"}
    (run / "train_summary.json").write_text(json.dumps({"sources": {"train": names, "validation": names}}))
    page = report.build_report([str(run)], str(tmp_path / "out"), examples=2).read_text(encoding="utf-8")
    tfidf, ref = "score tfidf, rho 0.7, sequence scope", "score ref_loss, rho 0.5, sequence scope"
    assert table_rows(page, "sources-train") == [
        ["sftgo", "lima", "206", "4", "1.6000", "3.0000", "1.1000", tfidf],
        ["sftgo", "web/<i>x</i>", "14", "4", "2.5000", "—", "—", tfidf]]
    assert table_rows(page, "sources-heldout") == [
        ["sftgo", "lima", "trainer, step 3", tfidf, "2.2000", "2.9000", "1.9000", "60"],
        ["sftgo", "web/<i>x</i>", "trainer, step 3", tfidf, "2.4000", "—", "—", "40"],
        ["sftgo", "lima", f"evaluation.run, {shards}", ref, "1.9000", "2.4000", "1.4000", "30"],
        ["sftgo", "web/<i>x</i>", f"evaluation.run, {shards}", ref, "2.1500", "—", "2.1500", "20"]]
    assert "<i>x</i>" not in page and "web/&lt;i&gt;x&lt;/i&gt;" in page
    data = (tmp_path / "out" / "sources.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and 'alt="CE per source"' in page
    # Runs without per-source numbers: a note, no plot.
    plain = report.build_report([str(report_inputs["sft"])], str(tmp_path / "plain"), examples=2).read_text(encoding="utf-8")
    assert "No per-source numbers in these runs" in plain and not (tmp_path / "plain" / "sources.png").exists()
