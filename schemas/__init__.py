"""Shard contract v1 shared by annotate and train: ``shard`` defines it, ``validate`` checks it."""

from schemas.shard import *  # noqa: F401,F403
from schemas.shard import SCHEMA_VERSION  # noqa: F401
