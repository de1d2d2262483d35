"""The docs schema, and the record batches of cleaned documents that the docs workers write.

Every input format lands in the same schema: OSCAR's quality metadata are columns (null or
empty for other sources) so that later filtering and statistics can use them.
"""
from __future__ import annotations

import pyarrow as pa

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


def build_docs_batch(ids: list[str], source: str, titles: pa.Array, urls: pa.Array, metas: list[dict] | None,
                     texts: pa.Array) -> pa.RecordBatch:
    """One record batch of cleaned documents: `texts` with each document's id, its source, and
    what the reader found (`metas`: OSCAR's metadata per document, None when there is none)."""
    num_rows = len(texts)
    if metas is None:
        # Offsets from a zeroed buffer: pa.array(an ndarray) imports numpy.ma (~20 ms in each worker).
        offsets = pa.Array.from_buffers(pa.int32(), num_rows + 1, [None, pa.py_buffer(bytes(4 * (num_rows + 1)))])
        no_list = pa.ListArray.from_arrays(offsets, pa.array([], pa.string()))
        meta_columns = {"quality_warnings": no_list, "categories": no_list,
                        "harmful_pp": pa.nulls(num_rows, pa.float64()), "lang_score": pa.nulls(num_rows, pa.float64())}
    else:
        meta_columns = {
            "quality_warnings": [meta.get("quality_warnings") or [] for meta in metas],
            "categories": [meta.get("categories") or [] for meta in metas],
            "harmful_pp": [meta.get("harmful_pp") for meta in metas], "lang_score": [meta.get("lang_score") for meta in metas],
        }
    columns = {"id": ids, "source": [source] * num_rows, "title": titles, "url": urls, "text": texts, **meta_columns}
    arrays = [columns[name] if isinstance(columns[name], pa.Array) else pa.array(columns[name], DOCS_SCHEMA.field(name).type)
              for name in DOCS_SCHEMA.names]
    return pa.RecordBatch.from_arrays(arrays, schema=DOCS_SCHEMA)
