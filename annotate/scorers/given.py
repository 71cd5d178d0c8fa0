"""Given importance: the corpus supplies it (per-message weights, character spans); this scorer stores it.

The values are read and placed on tokens at tokenize time (data/given.py: fields, token rule, rejects),
where the records, the rendered text and the token offsets are at hand, and reach this scorer in the
staging-only column ``_given`` (NaN where the record says nothing). The scorer fills those tokens with
``given.default``, so the score is defined for every token, template tokens included.

Because the values come from the records, ``given`` cannot be added with ``--add-scorers`` (finished
shards hold no records); annotate refuses that before Ray starts.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from annotate.scorers import ScorerContext, register
from data.given import GIVEN_COLUMN
from schemas.shard import ScorerInfo


@register
class GivenScorer:
    """The corpus's own token importance (data/given.py); ``default`` where it gives none."""

    name = "given"
    uses_gpu = False
    needs_records = True  # its values come from the tokenize step: not addable to finished shards

    @dataclass
    class Options:
        default: float = 0.0  # value of every token no span or message weight covers (template tokens too)

    def __init__(self, options: Options, context: ScorerContext):
        if isinstance(options.default, bool) or not isinstance(options.default, (int, float)) or not math.isfinite(options.default):
            raise ValueError(f"given.default: {options.default!r} is not a finite number")
        self.options = options
        self.context = context

    def setup(self) -> None:
        """Nothing to load."""

    def info(self) -> ScorerInfo:
        return ScorerInfo(self.name, model=None, revision=None, params=asdict(self.options))

    def score(self, batch: pa.Table) -> list[np.ndarray]:
        if GIVEN_COLUMN not in batch.column_names:
            raise ValueError(f"given: the batch has no {GIVEN_COLUMN} column (the tokenize step's per-token given values); "
                             "given is computed from the records in a full annotate run, never on finished shards")
        column = batch[GIVEN_COLUMN]
        values = pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.float32)
        values = np.where(np.isnan(values), np.float32(self.options.default), values)
        lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
        return np.split(values, np.cumsum(lengths)[:-1]) if len(lengths) else []
