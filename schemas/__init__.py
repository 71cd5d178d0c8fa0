"""Shard contract shared by annotate, data and train: ``shard`` defines it, ``directory`` opens an
annotated directory, ``validate`` checks it."""

from schemas.shard import *  # noqa: F403
from schemas.shard import SCHEMA_VERSION  # noqa: F401
