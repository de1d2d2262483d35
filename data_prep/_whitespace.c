/* data_prep._whitespace: clean_whitespace (data_prep/clean.py) of every string of an Arrow
 * string column, in one pass over its UTF-8 bytes.
 *
 * Per string: a content character is written preceded by "\n" if a newline came since the
 * previous content character, else by " " if whitespace came since then, and by nothing
 * before the first one; whitespace and newlines at either end are dropped. That is exactly
 * "split on \n, collapse runs of whitespace, strip each line, drop empty lines, join".
 *
 * Whitespace is what str.isspace() accepts, less "\n" (clean.SPACES; the tests check the two
 * agree on every code point). In UTF-8:
 *   \t \v \f \r (09 0B 0C 0D), 1C-1F, space (20)
 *   U+0085 C2 85, U+00A0 C2 A0, U+1680 E1 9A 80,
 *   U+2000-U+200A E2 80 80-8A, U+2028/U+2029 E2 80 A8/A9, U+202F E2 80 AF, U+205F E2 81 9F,
 *   U+3000 E3 80 80
 * Every other byte, invalid UTF-8 included, is content and is copied as is. Every pattern
 * starts with an ASCII or a lead byte, so in valid UTF-8 a match starts on a character.
 *
 * Runs of content are found and copied 16 bytes at a time with SSE2 (every x86-64); without
 * it (other CPUs, or -DWHITESPACE_NO_SIMD) byte by byte, with the same output. The GIL is
 * released while the loop runs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

enum { CONTENT = 0, SPACE = 1, NEWLINE = 2, MAYBE = 3 /* lead byte of a multi-byte space */ };

static unsigned char byte_class[256];

static void init_byte_class(void)
{
    memset(byte_class, CONTENT, sizeof byte_class);
    byte_class['\t'] = byte_class['\v'] = byte_class['\f'] = byte_class['\r'] = SPACE;
    for (int c = 0x1c; c <= 0x1f; c++)
        byte_class[c] = SPACE;
    byte_class[' '] = SPACE;
    byte_class['\n'] = NEWLINE;
    byte_class[0xc2] = byte_class[0xe1] = byte_class[0xe2] = byte_class[0xe3] = MAYBE;
}

/* Byte length of the multi-byte space at p (whose first byte is of class MAYBE), 0 if none;
 * reads nothing at or past end. */
static inline Py_ssize_t multibyte_space(const unsigned char *p, const unsigned char *end)
{
    switch (p[0]) {
    case 0xc2:
        return (end - p >= 2 && (p[1] == 0x85 || p[1] == 0xa0)) ? 2 : 0;
    case 0xe1:
        return (end - p >= 3 && p[1] == 0x9a && p[2] == 0x80) ? 3 : 0;
    case 0xe2:
        if (end - p < 3)
            return 0;
        if (p[1] == 0x80)
            return ((p[2] >= 0x80 && p[2] <= 0x8a) || p[2] == 0xa8 || p[2] == 0xa9 || p[2] == 0xaf) ? 3 : 0;
        return (p[1] == 0x81 && p[2] == 0x9f) ? 3 : 0;
    case 0xe3:
        return (end - p >= 3 && p[1] == 0x80 && p[2] == 0x80) ? 3 : 0;
    default:
        return 0;
    }
}

#if defined(__SSE2__) && !defined(WHITESPACE_NO_SIMD)
#include <emmintrin.h>
#define USE_SSE2 1

/* 0xff for the bytes that may be or start whitespace: <= 0x20 (the ASCII spaces, "\n", and a
 * few control characters), C2, E1, E2, E3. */
static inline __m128i maybe_space16(__m128i v)
{
    __m128i m = _mm_cmpeq_epi8(_mm_min_epu8(v, _mm_set1_epi8(0x20)), v);
    m = _mm_or_si128(m, _mm_cmpeq_epi8(v, _mm_set1_epi8((char)0xc2)));
    m = _mm_or_si128(m, _mm_cmpeq_epi8(v, _mm_set1_epi8((char)0xe1)));
    m = _mm_or_si128(m, _mm_cmpeq_epi8(v, _mm_set1_epi8((char)0xe2)));
    return _mm_or_si128(m, _mm_cmpeq_epi8(v, _mm_set1_epi8((char)0xe3)));
}

/* How many of the 16 bytes at p are copied as they are: those before the first byte <= 0x20,
 * C2, E1, E2, or E3 80 80 (U+3000), except a lone " " or "\n" between two bytes that are
 * surely content, which the output keeps as it is too (a word space, a line break: most of
 * the whitespace in documentation text). E3 leads all kana, so it is looked at with its next
 * two bytes; C2, E1, E2 are rarer and the byte-wise step sorts them out. A lone space in the
 * first byte is left to that step too: what came before it is in the previous chunk.
 * Reads p[0..17]: the caller makes sure they are in the string. */
static inline unsigned content_run16(const unsigned char *p)
{
    const __m128i v = _mm_loadu_si128((const __m128i *)p);
    const __m128i v1 = _mm_loadu_si128((const __m128i *)(p + 1));
    const __m128i v2 = _mm_loadu_si128((const __m128i *)(p + 2));
    __m128i m = _mm_cmpeq_epi8(_mm_min_epu8(v, _mm_set1_epi8(0x20)), v);
    m = _mm_or_si128(m, _mm_cmpeq_epi8(v, _mm_set1_epi8((char)0xc2)));
    m = _mm_or_si128(m, _mm_cmpeq_epi8(v, _mm_set1_epi8((char)0xe1)));
    m = _mm_or_si128(m, _mm_cmpeq_epi8(v, _mm_set1_epi8((char)0xe2)));
    const __m128i k80 = _mm_set1_epi8((char)0x80);
    m = _mm_or_si128(m, _mm_and_si128(_mm_cmpeq_epi8(v, _mm_set1_epi8((char)0xe3)),
                                      _mm_and_si128(_mm_cmpeq_epi8(v1, k80), _mm_cmpeq_epi8(v2, k80))));
    /* byte i of `before` is p[i - 1]; byte 0 is 0, which may be whitespace: never lone */
    const __m128i before = _mm_slli_si128(v, 1);
    const __m128i lone = _mm_andnot_si128(_mm_or_si128(maybe_space16(before), maybe_space16(v1)),
                                          _mm_or_si128(_mm_cmpeq_epi8(v, _mm_set1_epi8(' ')),
                                                       _mm_cmpeq_epi8(v, _mm_set1_epi8('\n'))));
    const unsigned mask = (unsigned)_mm_movemask_epi8(_mm_andnot_si128(lone, m));
    return mask ? (unsigned)__builtin_ctz(mask) : 16;
}
#endif

/* Cleans [p, end) into out; returns the number of bytes written (never more than end - p).
 * Never reads outside [p, end). */
static Py_ssize_t clean_one(const unsigned char *p, const unsigned char *end, unsigned char *out)
{
    unsigned char *o = out;
    unsigned char sep = 0; /* owed before the next content byte: ' ', '\n' or nothing */
    while (p < end) {
#ifdef USE_SSE2
        /* Content runs 16 bytes at a time (~3x faster on Japanese text). The store writes all 16
         * bytes but keeps `run`: it stays inside the output buffer, as o is never further into
         * the output than p is into the input (a separator stands for a dropped byte). */
        if (end - p >= 18) {
            const unsigned run = content_run16(p);
            if (run) {
                if (sep) {
                    if (o != out)
                        *o++ = sep;
                    sep = 0;
                }
                _mm_storeu_si128((__m128i *)o, _mm_loadu_si128((const __m128i *)p));
                o += run;
                p += run;
                if (run == 16)
                    continue;
            }
        }
#endif
        /* One byte, or one whitespace character. */
        const int cls = byte_class[*p];
        const Py_ssize_t k = (cls == SPACE || cls == NEWLINE) ? 1 : (cls == MAYBE) ? multibyte_space(p, end) : 0;
        if (k) {
            sep = (cls == NEWLINE || sep == '\n') ? '\n' : ' ';
            p += k;
        } else {
            if (sep) {
                if (o != out)
                    *o++ = sep;
                sep = 0;
            }
            *o++ = *p++;
        }
    }
    return o - out;
}

/* Offsets of either width, read and written with memcpy: a buffer need not be aligned. */
static inline int64_t get_offset(const char *offsets, Py_ssize_t i, int width)
{
    if (width == 4) {
        int32_t v;
        memcpy(&v, offsets + i * 4, 4);
        return v;
    }
    int64_t v;
    memcpy(&v, offsets + i * 8, 8);
    return v;
}

static inline void put_offset(char *offsets, Py_ssize_t i, int width, int64_t value)
{
    if (width == 4) {
        int32_t v = (int32_t)value;
        memcpy(offsets + i * 4, &v, 4);
    } else {
        memcpy(offsets + i * 8, &value, 8);
    }
}

PyDoc_STRVAR(clean_doc,
"clean(data, offsets, offset_width, out_data, out_offsets) -> int\n\n"
"clean_whitespace of every string of an Arrow string column, written into out_data; returns\n"
"the number of bytes written. data: the UTF-8 data buffer; offsets: the column's own n + 1\n"
"offsets into it (int32 for offset_width 4, int64 for 8; they need not start at 0).\n"
"out_data: writable, at least offsets[n] - offsets[0] bytes (the output is never longer than\n"
"the input), not overlapping data; out_offsets: writable, at least n + 1 offsets, receives\n"
"the output's, of the same width, from 0.");

static int overlap(const Py_buffer *a, const Py_buffer *b)
{
    const char *a0 = a->buf, *b0 = b->buf;
    return a->len > 0 && b->len > 0 && a0 < b0 + b->len && b0 < a0 + a->len;
}

static PyObject *clean(PyObject *self, PyObject *args)
{
    PyObject *objs[4];
    int width;
    if (!PyArg_ParseTuple(args, "OOiOO:clean", &objs[0], &objs[1], &width, &objs[2], &objs[3]))
        return NULL;
    if (width != 4 && width != 8) {
        PyErr_Format(PyExc_ValueError, "offset_width must be 4 or 8, not %d", width);
        return NULL;
    }
    /* data, offsets, out_data, out_offsets */
    Py_buffer views[4];
    int got = 0;
    PyObject *result = NULL;
    for (; got < 4; got++)
        if (PyObject_GetBuffer(objs[got], &views[got], got < 2 ? PyBUF_SIMPLE : PyBUF_WRITABLE) < 0)
            goto done;
    const Py_buffer *data = &views[0], *offsets = &views[1], *out_data = &views[2], *out_offsets = &views[3];
    const char *offs = (const char *)offsets->buf;

    if (offsets->len < width || offsets->len % width != 0) {
        PyErr_Format(PyExc_ValueError, "offsets: %zd bytes is not n + 1 >= 1 offsets of %d bytes",
                     offsets->len, width);
        goto done;
    }
    const Py_ssize_t n = offsets->len / width - 1;
    const int64_t first = get_offset(offs, 0, width);
    if (first < 0 || first > (int64_t)data->len) {
        PyErr_Format(PyExc_ValueError, "offset 0 (%lld) is outside the data buffer (%zd bytes)",
                     (long long)first, data->len);
        goto done;
    }
    for (Py_ssize_t i = 1; i <= n; i++) {
        const int64_t prev = get_offset(offs, i - 1, width), cur = get_offset(offs, i, width);
        if (cur < prev || cur > (int64_t)data->len) {
            PyErr_Format(PyExc_ValueError,
                         "offset %zd (%lld) is below the previous one (%lld) or past the data buffer (%zd bytes)",
                         i, (long long)cur, (long long)prev, data->len);
            goto done;
        }
    }
    const Py_ssize_t used = (Py_ssize_t)(get_offset(offs, n, width) - first);
    if (out_data->len < used || out_offsets->len < offsets->len) {
        PyErr_Format(PyExc_ValueError, "output buffers of %zd and %zd bytes, %zd and %zd needed",
                     out_data->len, out_offsets->len, used, offsets->len);
        goto done;
    }
    if (overlap(out_data, data) || overlap(out_data, offsets) || overlap(out_offsets, data)
        || overlap(out_offsets, offsets) || overlap(out_data, out_offsets)) {
        PyErr_SetString(PyExc_ValueError, "the output buffers overlap the input or each other");
        goto done;
    }

    const unsigned char *in = (const unsigned char *)data->buf;
    unsigned char *out = (unsigned char *)out_data->buf;
    char *out_offs = (char *)out_offsets->buf;
    Py_ssize_t written = 0;
    Py_BEGIN_ALLOW_THREADS
    put_offset(out_offs, 0, width, 0);
    int64_t start = first;
    for (Py_ssize_t i = 0; i < n; i++) {
        const int64_t stop = get_offset(offs, i + 1, width);
        written += clean_one(in + start, in + stop, out + written);
        put_offset(out_offs, i + 1, width, written);
        start = stop;
    }
    Py_END_ALLOW_THREADS
    result = PyLong_FromSsize_t(written);

done:
    while (got > 0)
        PyBuffer_Release(&views[--got]);
    return result;
}

static PyMethodDef methods[] = {
    {"clean", clean, METH_VARARGS, clean_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_whitespace",
    "clean_whitespace of Arrow string columns in C (see data_prep.clean.clean_whitespace_column).",
    -1, methods,
};

PyMODINIT_FUNC PyInit__whitespace(void)
{
    init_byte_class();
    return PyModule_Create(&module);
}
