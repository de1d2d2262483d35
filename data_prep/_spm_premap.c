/* data_prep._spm_premap: a SentencePiece model's character normalisation, done ahead of the
 * encode from a table (see data_prep/sp_encode.py for why and how it is used).
 *
 * SentencePiece normalises a text by a longest-match lookup, at every character, in a
 * darts-clone double-array trie of rules (NormalizerSpec.precompiled_charsmap): the bytes
 * <uint32 trie size><trie units><NUL-terminated replacement strings>. A rule's key is one or
 * more whole UTF-8 characters. A rule of two or more characters can only match where the
 * text's next character is the second character of some such rule (the "second characters":
 * combining marks, half-width voicing marks, Hangul jamo; 140 of them in nmt_nfkc). So in a
 * text with none of them every match is a one-character rule, and normalising is a per-character
 * map.
 *
 * compile_charsmap(blob) -> table: uint32 entries[0x110000], one per code point; a bitmap of
 * the BMP code points whose entry is not COPY; 8 bytes of flags; the replacement strings. An
 * entry is COPY (no one-character rule), FALLBACK (a second character, U+0000, or a rule whose
 * replacement the per-character map cannot stand in for), or ((offset + 1) << 8 | length) of
 * its replacement.
 *
 * prepare(model) -> (table, identity model) | None: the same from a whole spiece.model, plus
 * the model with an identity normaliser, read and rewritten at the protobuf wire level.
 *
 * premap(texts, table) -> list: per text (bytes), the text with every character replaced by
 * its rule; the same object when nothing changed; None when the text holds a FALLBACK
 * character, for the caller to give to the model as it is. Bytes that are not UTF-8 are
 * copied: SentencePiece reads each one as U+FFFD, and no rule starts at one.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include "_utf8.h"
#ifdef __SSE2__
#include <emmintrin.h>
#endif

#define NUM_CODE_POINTS 0x110000
#define COPY 0u
#define FALLBACK 1u
#define MAX_REPLACEMENT 255
#define BMP_BITMAP_BYTES (0x10000 / 8)
#define FLAGS_BYTES 8
#define TABLE_HEADER_BYTES (NUM_CODE_POINTS * 4 + BMP_BITMAP_BYTES + FLAGS_BYTES)
#define PRINTABLE_ASCII_COPIED 1 /* flag: no rule maps 20-7E (true of nmt_nfkc, not of nfkc_cf) */

/* compile_charsmap's bytes, as premap reads them. */
typedef struct {
    const uint32_t *entries;         /* per code point */
    const unsigned char *bmp_mapped; /* a bit per BMP code point: its entry is not COPY (8 KB: stays in L1) */
    uint32_t flags;
    const unsigned char *pool;       /* the replacement strings */
    size_t pool_size;
} Table;

/* --- the double-array trie, as darts-clone lays it out ----------------------------------- */

typedef struct {
    const uint32_t *units;
    size_t num_units;
} Trie;

static uint32_t unit_offset(uint32_t unit) { return (unit >> 10) << ((unit & (1u << 9)) >> 6); }
static int unit_has_leaf(uint32_t unit) { return (unit >> 8) & 1; }
static uint32_t unit_label(uint32_t unit) { return unit & ((1u << 31) | 0xFF); }
static uint32_t unit_value(uint32_t unit) { return unit & ((1u << 31) - 1); }

/* The node reached from `node` by `byte` (its base position, where its children hang), or -1. */
static int64_t trie_child(const Trie *trie, int64_t node, unsigned char byte)
{
    uint64_t pos = (uint64_t)node ^ byte;
    if (pos >= trie->num_units || unit_label(trie->units[pos]) != byte)
        return -1;
    return (int64_t)(pos ^ unit_offset(trie->units[pos]));
}

/* Whether a key ends at `node`, reached from `parent` by `byte`: its value is then at `node`. */
static int trie_has_value(const Trie *trie, int64_t parent, unsigned char byte, int64_t node)
{
    return unit_has_leaf(trie->units[(uint64_t)parent ^ byte]) && (uint64_t)node < trie->num_units;
}

/* --- the rules, character by character --------------------------------------------------- */

typedef struct {
    int64_t node;   /* where the character's bytes lead */
    int64_t parent; /* the node before its last byte */
    unsigned char bytes[4];
    int depth;
} Path;

/* Calls visit(trie, path, cp, context) for every whole character that continues a key from
 * `node`: walks the children a byte at a time, trying only bytes UTF-8 allows next, so the
 * work follows the trie's size, not the code space's. Sets *broken if a key ends inside a
 * character or holds bytes that are not UTF-8 (SentencePiece's builder makes no such key;
 * a table could not stand in for one). */
static void for_each_character(const Trie *trie, int64_t node,
                               void (*visit)(const Trie *, const Path *, uint32_t, void *), void *context,
                               int *broken)
{
    for (unsigned lead = 1; lead <= 0xFF; lead++) {
        int length = utf8_length(lead);
        int64_t child = trie_child(trie, node, (unsigned char)lead);
        if (child < 0)
            continue;
        if (length == 0) {  /* no character starts with this byte */
            *broken = 1;
            continue;
        }
        Path stack[3 * 64 + 1], top;
        int size = 0;
        stack[size++] = (Path){child, node, {(unsigned char)lead}, 1};
        while (size > 0) {
            top = stack[--size];
            if (top.depth == length) {
                uint32_t cp;
                if (utf8_decode(top.bytes, length, &cp) == length)
                    visit(trie, &top, cp, context);
                else if (trie_has_value(trie, top.parent, top.bytes[top.depth - 1], top.node))
                    *broken = 1;
                continue;
            }
            if (trie_has_value(trie, top.parent, top.bytes[top.depth - 1], top.node))
                *broken = 1;
            for (unsigned cont = 0x80; cont <= 0xBF; cont++) {
                int64_t next = trie_child(trie, top.node, (unsigned char)cont);
                if (next < 0)
                    continue;
                stack[size] = top;
                stack[size].parent = top.node;
                stack[size].node = next;
                stack[size].bytes[top.depth] = (unsigned char)cont;
                stack[size].depth = top.depth + 1;
                size++;
            }
        }
    }
}

static int is_valid_utf8(const unsigned char *s, size_t n)
{
    uint32_t cp;
    for (size_t i = 0; i < n;) {
        int length = utf8_decode(s + i, (ptrdiff_t)(n - i), &cp);
        if (length == 0)
            return 0;
        i += length;
    }
    return 1;
}

/* The entry for a one-character rule whose replacement starts at pool[offset]. */
static uint32_t replacement_entry(const unsigned char *pool, size_t pool_size, uint32_t offset)
{
    if (offset >= pool_size || offset + 1 >= (1u << 24))
        return FALLBACK;
    const unsigned char *end = memchr(pool + offset, 0, pool_size - offset);
    if (end == NULL)
        return FALLBACK;
    size_t length = (size_t)(end - (pool + offset));
    /* SentencePiece collapses a run of spaces across characters but not inside one rule's
     * replacement: such a replacement would come out differently, so leave it to the model. */
    if (length > MAX_REPLACEMENT || memmem(pool + offset, length, "  ", 2) != NULL
        || !is_valid_utf8(pool + offset, length))
        return FALLBACK;
    return ((offset + 1) << 8) | (uint32_t)length;
}

typedef struct {
    uint32_t *entries;
    const unsigned char *pool;
    size_t pool_size;
    int broken; /* a key that is not whole UTF-8 characters */
} Compiling;

/* A second character of a longer rule: a text with it is left to the model. */
static void visit_second(const Trie *trie, const Path *path, uint32_t cp, void *context)
{
    (void)trie, (void)path;
    ((Compiling *)context)->entries[cp] = FALLBACK;
}

/* A character some rule starts with: its own rule's replacement if it has one, and every
 * character that can follow it in a longer rule marked. */
static void visit_first(const Trie *trie, const Path *path, uint32_t cp, void *context)
{
    Compiling *c = context;
    if (c->entries[cp] != FALLBACK && trie_has_value(trie, path->parent, path->bytes[path->depth - 1], path->node))
        c->entries[cp] = replacement_entry(c->pool, c->pool_size, unit_value(trie->units[path->node]));
    for_each_character(trie, path->node, visit_second, context, &c->broken);
}

/* --- a growable byte buffer ------------------------------------------------------------ */

typedef struct {
    unsigned char *data;
    size_t size, capacity;
} Buffer;

static int buffer_reserve(Buffer *buffer, size_t more)
{
    if (buffer->size + more <= buffer->capacity)
        return 0;
    size_t capacity = buffer->capacity ? buffer->capacity : 4096;
    while (capacity < buffer->size + more)
        capacity *= 2;
    unsigned char *data = PyMem_Realloc(buffer->data, capacity);
    if (data == NULL)
        return -1;
    buffer->data = data;
    buffer->capacity = capacity;
    return 0;
}

static int append(Buffer *out, const void *data, size_t size)
{
    if (buffer_reserve(out, size) < 0)
        return -1;
    memcpy(out->data + out->size, data, size);
    out->size += size;
    return 0;
}

static int write_varint(Buffer *out, uint64_t value)
{
    unsigned char bytes[10];
    size_t n = 0;
    do {
        bytes[n++] = (unsigned char)((value & 0x7F) | (value > 0x7F ? 0x80 : 0));
        value >>= 7;
    } while (value);
    return append(out, bytes, n);
}

/* --- the table -------------------------------------------------------------------------- */

/* The table from a charsmap blob, or NULL with ValueError (or MemoryError) set. */
static PyObject *build_table(const unsigned char *data, Py_ssize_t size)
{
    uint32_t trie_size = 0;
    if (size >= 4)
        memcpy(&trie_size, data, 4);  /* little-endian, as on every machine this runs on */
    if (size < 8 || trie_size % 4 != 0 || trie_size == 0 || (Py_ssize_t)trie_size > size - 4) {
        PyErr_SetString(PyExc_ValueError, "not a SentencePiece precompiled charsmap");
        return NULL;
    }
    uint32_t *units = PyMem_Malloc(trie_size);  /* aligned copy */
    const unsigned char *pool = data + 4 + trie_size;
    size_t pool_size = (size_t)(size - 4 - trie_size);
    PyObject *table = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(TABLE_HEADER_BYTES + pool_size));
    if (units == NULL || table == NULL) {
        PyMem_Free(units);
        Py_XDECREF(table);
        return PyErr_NoMemory();
    }
    memcpy(units, data + 4, trie_size);
    Trie trie = {units, trie_size / 4};
    uint32_t *entries = (uint32_t *)PyBytes_AS_STRING(table);
    unsigned char *bmp_mapped = (unsigned char *)PyBytes_AS_STRING(table) + NUM_CODE_POINTS * 4;
    memset(entries, 0, TABLE_HEADER_BYTES);
    memcpy(PyBytes_AS_STRING(table) + TABLE_HEADER_BYTES, pool, pool_size);

    Compiling compiling = {entries, pool, pool_size, 0};
    for_each_character(&trie, (int64_t)unit_offset(units[0]), visit_first, &compiling, &compiling.broken);
    if (compiling.broken) {
        PyMem_Free(units);
        Py_DECREF(table);
        PyErr_SetString(PyExc_ValueError, "the charsmap has a rule whose key is not whole UTF-8 characters");
        return NULL;
    }
    entries[0] = FALLBACK;  /* darts-clone keys end at NUL: leave U+0000 to the model */
    for (uint32_t cp = 0; cp < 0x10000; cp++)
        if (entries[cp] != COPY)
            bmp_mapped[cp >> 3] |= (unsigned char)(1 << (cp & 7));
    uint32_t flags = PRINTABLE_ASCII_COPIED;
    for (uint32_t cp = 0x20; cp < 0x7F; cp++)
        if (entries[cp] != COPY)
            flags = 0;
    memcpy(bmp_mapped + BMP_BITMAP_BYTES, &flags, sizeof flags);
    PyMem_Free(units);
    return table;
}

PyDoc_STRVAR(compile_doc,
"compile_charsmap(precompiled_charsmap: bytes) -> bytes\n\n"
"The per-code-point table premap() reads, from a NormalizerSpec's precompiled_charsmap.\n"
"Raises ValueError if the blob is not a charsmap.");

static PyObject *compile_charsmap(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer blob;
    if (!PyArg_ParseTuple(args, "y*", &blob))
        return NULL;
    PyObject *table = build_table(blob.buf, blob.len);
    PyBuffer_Release(&blob);
    return table;
}

/* --- the model file: a ModelProto, read and rewritten at the protobuf wire level ----------
 * sentencepiece_model.proto: ModelProto { repeated SentencePiece pieces = 1; ...;
 * NormalizerSpec normalizer_spec = 3; ... }, SentencePiece { ...; Type type = 3; } with
 * USER_DEFINED = 4, NormalizerSpec { string name = 1; bytes precompiled_charsmap = 2; ... }.
 * Reading these few fields here spares importing protobuf (~20 ms) before the workers fork. */

enum { WIRE_VARINT = 0, WIRE_FIXED64 = 1, WIRE_LEN = 2, WIRE_FIXED32 = 5 };
#define MODEL_PIECES 1
#define MODEL_NORMALIZER_SPEC 3
#define PIECE_TYPE 3
#define PIECE_USER_DEFINED 4
#define SPEC_NAME 1
#define SPEC_CHARSMAP 2

typedef struct {
    const unsigned char *p, *end;
} Reader;

typedef struct {
    uint32_t number;
    int wire_type;
    uint64_t varint;
    const unsigned char *data; /* a LEN field's bytes */
    size_t size;
    const unsigned char *start; /* the field's first byte (its key) */
} Field;

static int read_varint(Reader *r, uint64_t *value)
{
    *value = 0;
    for (int shift = 0; shift < 64 && r->p < r->end; shift += 7) {
        unsigned char byte = *r->p++;
        *value |= (uint64_t)(byte & 0x7F) << shift;
        if (!(byte & 0x80))
            return 0;
    }
    return -1;
}

/* 1: a field read; 0: the end; -1: not protobuf (or a group, which these messages never hold). */
static int next_field(Reader *r, Field *f)
{
    uint64_t key;
    if (r->p == r->end)
        return 0;
    f->start = r->p;
    if (read_varint(r, &key) < 0 || (key >> 3) == 0 || (key >> 3) > UINT32_MAX)
        return -1;
    f->number = (uint32_t)(key >> 3);
    f->wire_type = (int)(key & 7);
    switch (f->wire_type) {
    case WIRE_VARINT:
        return read_varint(r, &f->varint) < 0 ? -1 : 1;
    case WIRE_FIXED64:
    case WIRE_FIXED32: {
        size_t size = f->wire_type == WIRE_FIXED64 ? 8 : 4;
        if ((size_t)(r->end - r->p) < size)
            return -1;
        r->p += size;
        return 1;
    }
    case WIRE_LEN: {
        uint64_t size;
        if (read_varint(r, &size) < 0 || size > (uint64_t)(r->end - r->p))
            return -1;
        f->data = r->p;
        f->size = (size_t)size;
        r->p += size;
        return 1;
    }
    default:
        return -1;
    }
}

static int is_user_defined_piece(const unsigned char *data, size_t size)
{
    Reader r = {data, data + size};
    Field f;
    int found;
    while ((found = next_field(&r, &f)) == 1)
        if (f.number == PIECE_TYPE && f.wire_type == WIRE_VARINT && f.varint == PIECE_USER_DEFINED)
            return 1;
    return found < 0 ? -1 : 0;
}


/* The normalizer spec with name "identity" and no charsmap, everything else as it was. */
static int write_identity_spec(Buffer *out, const unsigned char *spec, size_t spec_size)
{
    Reader r = {spec, spec + spec_size};
    Field f;
    int found;
    static const char name[] = "identity";
    if (write_varint(out, (SPEC_NAME << 3) | WIRE_LEN) < 0 || write_varint(out, sizeof name - 1) < 0
        || append(out, name, sizeof name - 1) < 0)
        return -1;
    while ((found = next_field(&r, &f)) == 1)
        if (f.number != SPEC_NAME && f.number != SPEC_CHARSMAP && append(out, f.start, (size_t)(r.p - f.start)) < 0)
            return -1;
    return found;
}

PyDoc_STRVAR(prepare_doc,
"prepare(model: bytes) -> tuple[bytes, bytes] | None\n\n"
"From a serialized SentencePiece ModelProto: premap()'s table for its charsmap, and the same\n"
"model with an identity normaliser. None when it has no charsmap, has user-defined symbols,\n"
"or cannot be read here (SentencePiece then reads it, and says what is wrong).");

static PyObject *prepare(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer model;
    if (!PyArg_ParseTuple(args, "y*", &model))
        return NULL;
    Reader r = {model.buf, (const unsigned char *)model.buf + model.len};
    Field f;
    const unsigned char *spec = NULL, *charsmap = NULL;
    size_t spec_size = 0, charsmap_size = 0;
    int found, specs = 0, charsmaps = 0, user_defined = 0;
    while ((found = next_field(&r, &f)) == 1) {
        if (f.number == MODEL_PIECES && f.wire_type == WIRE_LEN && is_user_defined_piece(f.data, f.size) != 0)
            user_defined = 1;  /* or a piece that is not protobuf */
        if (f.number == MODEL_NORMALIZER_SPEC && f.wire_type == WIRE_LEN) {
            spec = f.data;
            spec_size = f.size;
            specs++;
        }
    }
    if (found == 0 && specs == 1) {
        Reader spec_reader = {spec, spec + spec_size};
        while ((found = next_field(&spec_reader, &f)) == 1)
            if (f.number == SPEC_CHARSMAP && f.wire_type == WIRE_LEN) {
                charsmap = f.data;
                charsmap_size = f.size;
                charsmaps++;
            }
    }
    PyObject *result = NULL, *table = NULL;
    if (found != 0 || specs != 1 || charsmaps != 1 || charsmap_size == 0 || user_defined)
        goto none;
    if ((table = build_table(charsmap, (Py_ssize_t)charsmap_size)) == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_ValueError))
            goto done;
        PyErr_Clear();
        goto none;
    }
    /* the model again: every field as it was, then the identity spec in place of the old one */
    Buffer out = {NULL, 0, 0}, identity_spec = {NULL, 0, 0};
    r = (Reader){model.buf, (const unsigned char *)model.buf + model.len};
    int failed = 0;
    while (!failed && next_field(&r, &f) == 1)
        if (f.number != MODEL_NORMALIZER_SPEC)
            failed = append(&out, f.start, (size_t)(r.p - f.start)) < 0;
    failed = failed || write_identity_spec(&identity_spec, spec, spec_size) < 0
             || write_varint(&out, (MODEL_NORMALIZER_SPEC << 3) | WIRE_LEN) < 0
             || write_varint(&out, identity_spec.size) < 0 || append(&out, identity_spec.data, identity_spec.size) < 0;
    if (failed)
        PyErr_NoMemory();
    else
        result = Py_BuildValue("(Oy#)", table, (const char *)out.data, (Py_ssize_t)out.size);
    PyMem_Free(out.data);
    PyMem_Free(identity_spec.data);
    goto done;
none:
    result = Py_NewRef(Py_None);
done:
    Py_XDECREF(table);
    PyBuffer_Release(&model);
    return result;
}

/* --- premap ----------------------------------------------------------------------------- */

enum { MAPPED_NONE = 0, MAPPED_CHANGED = 1, MAPPED_FALLBACK = 2, MAPPED_NO_MEMORY = 3 };

static int is_continuation(unsigned char byte) { return (byte & 0xC0) == 0x80; }

static int is_mapped_in_bmp(const unsigned char *bmp_mapped, uint32_t cp) { return (bmp_mapped[cp >> 3] >> (cp & 7)) & 1; }

/* How many bytes from s[0] on are printable ASCII (20-7E), which no rule maps: up to the first
 * other byte, 16 at a time with SSE2. */
static Py_ssize_t printable_ascii_run(const unsigned char *s, Py_ssize_t n)
{
    Py_ssize_t i = 0;
#ifdef __SSE2__
    const __m128i low = _mm_set1_epi8(0x1F), del = _mm_set1_epi8(0x7F);
    for (; i + 16 <= n; i += 16) {
        __m128i chunk = _mm_loadu_si128((const __m128i *)(s + i));
        /* signed compare: bytes 80-FF are negative, so <= 1F catches them with 00-1F */
        __m128i other = _mm_or_si128(_mm_cmpgt_epi8(low, chunk), _mm_cmpeq_epi8(chunk, low));
        other = _mm_or_si128(other, _mm_cmpeq_epi8(chunk, del));
        int mask = _mm_movemask_epi8(other);
        if (mask != 0)
            return i + __builtin_ctz(mask);
    }
#endif
    while (i < n && s[i] >= 0x20 && s[i] < 0x7F)
        i++;
    return i;
}

/* Maps one text into `out`; returns one of the MAPPED_ values. Bytes that are not UTF-8 are
 * copied one at a time, as SentencePiece reads them (each as U+FFFD, map or no map: no rule
 * starts there). */
static int map_text(const unsigned char *s, Py_ssize_t n, const Table *table, Buffer *out)
{
    int changed = 0;
    Py_ssize_t run = 0, i = 0;  /* s[run:i] is copied as is, when a change or the end comes */
    out->size = 0;
    const unsigned char *bmp_mapped = table->bmp_mapped;
    int printable_copied = (table->flags & PRINTABLE_ASCII_COPIED) != 0;
    while (i < n) {
        uint32_t cp, entry;
        int length;
        /* the bulk of Japanese text: 3-byte characters (kana, kanji) that no rule maps */
        while (i + 2 < n && (s[i] & 0xF0) == 0xE0 && is_continuation(s[i + 1]) && is_continuation(s[i + 2])) {
            cp = ((uint32_t)(s[i] & 0x0F) << 12) | ((uint32_t)(s[i + 1] & 0x3F) << 6) | (s[i + 2] & 0x3F);
            if (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF) || is_mapped_in_bmp(bmp_mapped, cp))
                break;  /* not UTF-8, or mapped: the general step below */
            i += 3;
        }
        if (i >= n)
            break;
        unsigned char c = s[i];
        if (c < 0x80) {
            if (c >= 0x20 && c < 0x7F && printable_copied) {
                /* a lone one (a space between words) without the 16-byte set-up */
                i += i + 1 < n && s[i + 1] >= 0x20 && s[i + 1] < 0x7F ? printable_ascii_run(s + i, n - i) : 1;
                continue;
            }
            cp = c;
            length = 1;
        } else if ((length = utf8_decode(s + i, n - i, &cp)) == 0) {
            i++;  /* not UTF-8 */
            continue;
        }
        if (cp < 0x10000 && !is_mapped_in_bmp(bmp_mapped, cp)) {
            i += length;
            continue;
        }
        entry = table->entries[cp];
        if (entry == COPY) {
            i += length;
            continue;
        }
        size_t replacement = entry & 0xFF, offset = (entry >> 8) - 1;
        if (entry == FALLBACK || offset + replacement > table->pool_size)  /* the latter: not our table */
            return MAPPED_FALLBACK;
        if (buffer_reserve(out, (size_t)(i - run) + replacement) < 0)
            return MAPPED_NO_MEMORY;
        memcpy(out->data + out->size, s + run, (size_t)(i - run));
        out->size += (size_t)(i - run);
        memcpy(out->data + out->size, table->pool + offset, replacement);
        out->size += replacement;
        i += length;
        run = i;
        changed = 1;
    }
    if (!changed)
        return MAPPED_NONE;
    if (buffer_reserve(out, (size_t)(n - run)) < 0)
        return MAPPED_NO_MEMORY;
    memcpy(out->data + out->size, s + run, (size_t)(n - run));
    out->size += (size_t)(n - run);
    return MAPPED_CHANGED;
}

PyDoc_STRVAR(premap_doc,
"premap(texts: list[bytes], table: bytes) -> list[bytes | None]\n\n"
"Each text with every character replaced by its one-character rule (the same object if none\n"
"applies), or None if it holds a character the table leaves to the model.");

static PyObject *premap(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *texts;
    Py_buffer table;
    if (!PyArg_ParseTuple(args, "O!y*", &PyList_Type, &texts, &table))
        return NULL;
    if (table.len < TABLE_HEADER_BYTES) {
        PyBuffer_Release(&table);
        PyErr_SetString(PyExc_ValueError, "table is not from compile_charsmap");
        return NULL;
    }
    const unsigned char *bytes = table.buf;
    Table view = {(const uint32_t *)bytes, bytes + NUM_CODE_POINTS * 4, 0, bytes + TABLE_HEADER_BYTES,
                  (size_t)(table.len - TABLE_HEADER_BYTES)};
    memcpy(&view.flags, bytes + NUM_CODE_POINTS * 4 + BMP_BITMAP_BYTES, sizeof view.flags);
    Py_ssize_t count = PyList_GET_SIZE(texts);
    PyObject *result = PyList_New(count);
    Buffer out = {NULL, 0, 0};
    for (Py_ssize_t k = 0; result != NULL && k < count; k++) {
        PyObject *text = PyList_GET_ITEM(texts, k), *mapped;
        if (!PyBytes_Check(text)) {
            PyErr_Format(PyExc_TypeError, "premap: texts[%zd] is %s, not bytes", k, Py_TYPE(text)->tp_name);
            Py_CLEAR(result);
            break;
        }
        switch (map_text((const unsigned char *)PyBytes_AS_STRING(text), PyBytes_GET_SIZE(text), &view, &out)) {
        case MAPPED_NONE: mapped = Py_NewRef(text); break;
        case MAPPED_CHANGED: mapped = PyBytes_FromStringAndSize((const char *)out.data, (Py_ssize_t)out.size); break;
        case MAPPED_FALLBACK: mapped = Py_NewRef(Py_None); break;
        default: mapped = PyErr_NoMemory(); break;
        }
        if (mapped == NULL) {
            Py_CLEAR(result);
            break;
        }
        PyList_SET_ITEM(result, k, mapped);
    }
    PyMem_Free(out.data);
    PyBuffer_Release(&table);
    return result;
}

static PyMethodDef methods[] = {
    {"compile_charsmap", compile_charsmap, METH_VARARGS, compile_doc},
    {"prepare", prepare, METH_VARARGS, prepare_doc},
    {"premap", premap, METH_VARARGS, premap_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_spm_premap",
    "A SentencePiece model's character normalisation from a table (see data_prep.sp_encode).",
    -1, methods,
};

PyMODINIT_FUNC PyInit__spm_premap(void) { return PyModule_Create(&module); }
