"""The docs schema, and the record batches of cleaned documents that the docs workers write.

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


def build_docs_batch(ids: list[str], source: str, raws: list[RawDoc], texts: pa.Array) -> pa.RecordBatch:
    """One record batch of cleaned documents: `texts` (already an Arrow column) with each
    document's id, its source and what the reader found (`raws`, in the same order)."""
    metas = [raw.meta or {} for raw in raws]
    columns = {
        "id": ids, "source": [source] * len(raws), "title": [raw.title for raw in raws], "url": [raw.url for raw in raws],
        "quality_warnings": [meta.get("quality_warnings") or [] for meta in metas],
        "categories": [meta.get("categories") or [] for meta in metas],
        "harmful_pp": [meta.get("harmful_pp") for meta in metas], "lang_score": [meta.get("lang_score") for meta in metas],
    }
    arrays = [texts if name == "text" else pa.array(columns[name], DOCS_SCHEMA.field(name).type)
              for name in DOCS_SCHEMA.names]
    return pa.RecordBatch.from_arrays(arrays, schema=DOCS_SCHEMA)
