"""Evaluation and reporting of trained runs: benchmarks, held-out group losses and generations (evaluation.run),
the HTML report (evaluation.report). Reads what train/ writes; train/ never imports it."""
