"""train/metrics.py: the log line of a metrics record."""

from __future__ import annotations

from train.metrics import format_record


def test_log_line_keeps_counts_and_flags_integers():
    record = {"eval_ce": 2.0, "eval_important_loss": 3.14159, "eval_worse_group": 1, "eval_tokens": 1016,
              "eval_accuracy": 0.25}
    assert format_record(record) == ("eval_ce=2.0000, eval_important_loss=3.1416, eval_worse_group=1, eval_tokens=1016, "
                                     "eval_accuracy=0.2500")


def test_evaluate_and_report_write_under_runs_by_default():
    """Not into the checkout's root (issue 30): runs/ is where runs go, and git ignores it."""
    from evaluation.run import build_parser as evaluate_parser
    from evaluation.report import build_parser as report_parser

    assert evaluate_parser().parse_args(["RUN"]).output == "runs/evaluation.json"
    assert report_parser().parse_args(["RUN"]).output == "runs/report"
