"""The docs schema, and a column buffer that turns cleaned documents into record batches.

Every input format lands in the same schema: OSCAR's quality metadata are columns (null or
empty for other sources) so that later filtering and statistics can use them.
"""
from __future__ import annotations

import pyarrow as pa

from data_prep.readers import RawDoc

DOCS_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("source", pa.string()),
    ("title", pa.string()),
    ("url", pa.string()),
    ("text", pa.string()),
    ("quality_warnings", pa.list_(pa.string())),  # OSCAR 22.01+ metadata.quality_warnings
    ("categories", pa.list_(pa.string())),  # OSCAR metadata.categories (UT1 blocklists)
    ("harmful_pp", pa.float64()),  # OSCAR metadata.harmful_pp (perplexity under an adult-content model)
    ("lang_score", pa.float64()),  # OSCAR metadata.identification.prob
])


class DocBuffer:
    """Accumulates documents column-wise; `take()` empties it into one record batch."""

    def __init__(self) -> None:
        self.columns: dict[str, list] = {name: [] for name in DOCS_SCHEMA.names}

    def __len__(self) -> int:
        return len(self.columns["text"])

    def add(self, doc_id: str, source: str, raw: RawDoc, text: str) -> None:
        meta = raw.meta or {}
        values = (doc_id, source, raw.title, raw.url, text, meta.get("quality_warnings") or [],
                  meta.get("categories") or [], meta.get("harmful_pp"), meta.get("lang_score"))
        for name, value in zip(DOCS_SCHEMA.names, values):
            self.columns[name].append(value)

    def take(self) -> pa.RecordBatch:
        batch = pa.RecordBatch.from_pydict(self.columns, schema=DOCS_SCHEMA)
        self.columns = {name: [] for name in DOCS_SCHEMA.names}
        return batch
