"""Attribute a whole dataset, one resumable safetensors shard per batch.

`run` writes and reads the shards of a run folder; `readers` streams examples from .jsonl, .csv,
.parquet, .arrow or `datasets` folders; `distributed` runs the same job on a Ray cluster (the
`ray` extra).
"""

from fnattr.dataset.readers import (
    FORMATS as FORMATS,
    ON_BAD_ROW as ON_BAD_ROW,
    TABLES as TABLES,
    BadRow as BadRow,
    Cursor as Cursor,
    Example as Example,
    Examples as Examples,
    count_examples as count_examples,
    fingerprint as fingerprint,
    read_examples as read_examples,
)
from fnattr.dataset.runs import (
    RUN_FILE as RUN_FILE,
    RUN_FORMAT as RUN_FORMAT,
    SHARD as SHARD,
    Summary as Summary,
    attribute_chunk as attribute_chunk,
    describe as describe,
    ids as ids,
    load_shards as load_shards,
    run as run,
    run_settings as run_settings,
    shards as shards,
    show as show,
    summary as summary,
)
