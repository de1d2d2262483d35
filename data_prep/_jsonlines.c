/* data_prep._jsonlines: the documents of a block of generic JSON lines, read in one pass.
 *
 * scan(data, text_field) takes whole lines, each a JSON object or empty, and returns
 *   (offsets, chars, ids, titles, urls)
 * where offsets (int32, one more than the documents) and chars are the buffers of an Arrow
 * string column of the text fields, unescaped; ids a list of str (a string id, or the digits of
 * an integer one) or None; titles and urls lists of str ("" for null or absent). That is what
 * readers.generic_record makes of each line.
 *
 * It returns None for any block whose lines it cannot vouch for being read that way by the
 * per-line reader (the json module's grammar), and the caller falls back (json_blocks.py):
 * a text field that is absent, null or not a string; an id, title or url of another type
 * (floats, booleans, "-0", integers of more than 18 digits); one of those four fields named
 * twice (keys compared unescaped, as the json module does); a lone surrogate; a control
 * character in a string; NaN, Infinity or any other non-JSON value; more than one object on
 * a line; a line that starts with anything but "{" (a BOM); nesting deeper than MAX_DEPTH.
 * A block that is not valid UTF-8 is declined too. Bytes from 0x80 up are valid JSON only
 * inside strings, where read_string checks each sequence as it passes (Unicode's table 3-7:
 * no overlong forms, no surrogates, nothing above U+10FFFF) and copies it as it is; anywhere
 * else they fail the grammar. So a taken block needs no separate UTF-8 pass (Arrow's took as
 * long as this whole scan).
 *
 * Arrow's JSON reader did the same job at ~200 MB/s; most of a line is its text, which is
 * copied here in runs between escapes.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "_utf8.h"

#define MAX_DEPTH 256
#define MAX_ID_DIGITS 18

typedef struct {
    const unsigned char *p, *end;
} Cursor;

/* Non-zero for the bytes that end a run of plain ASCII string content: '"', '\\', control
 * characters, and the first byte of a multi-byte UTF-8 sequence or a byte that starts none. */
static unsigned char stops[256];

static void init_stops(void)
{
    for (int c = 0; c < 0x20; c++)
        stops[c] = 1;
    stops['"'] = stops['\\'] = 1;
    for (int c = 0x80; c < 0x100; c++)
        stops[c] = 1;
}

static inline void skip_space(Cursor *c)
{
    while (c->p < c->end && (*c->p == ' ' || *c->p == '\t' || *c->p == '\r'))
        c->p++;
}

static inline int hex4(const unsigned char *p, unsigned *out)
{
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        unsigned char ch = p[i];
        v <<= 4;
        if (ch >= '0' && ch <= '9')
            v |= ch - '0';
        else if (ch >= 'a' && ch <= 'f')
            v |= ch - 'a' + 10;
        else if (ch >= 'A' && ch <= 'F')
            v |= ch - 'A' + 10;
        else
            return -1;
    }
    *out = v;
    return 0;
}

static inline unsigned char *put_utf8(unsigned char *o, unsigned cp)
{
    if (cp < 0x80) {
        *o++ = (unsigned char)cp;
    } else if (cp < 0x800) {
        *o++ = (unsigned char)(0xc0 | (cp >> 6));
        *o++ = (unsigned char)(0x80 | (cp & 0x3f));
    } else if (cp < 0x10000) {
        *o++ = (unsigned char)(0xe0 | (cp >> 12));
        *o++ = (unsigned char)(0x80 | ((cp >> 6) & 0x3f));
        *o++ = (unsigned char)(0x80 | (cp & 0x3f));
    } else {
        *o++ = (unsigned char)(0xf0 | (cp >> 18));
        *o++ = (unsigned char)(0x80 | ((cp >> 12) & 0x3f));
        *o++ = (unsigned char)(0x80 | ((cp >> 6) & 0x3f));
        *o++ = (unsigned char)(0x80 | (cp & 0x3f));
    }
    return o;
}

/* The string at c->p (its opening quote), unescaped at *out (which then points past what was
 * written), or only checked if out is NULL; the cursor ends past the closing quote. Returns 0,
 * or -1 to bail. Never writes more bytes than it reads: an escape is longer than its output. */
static int read_string(Cursor *c, unsigned char **out)
{
    const unsigned char *p = c->p + 1, *end = c->end;
    unsigned char *o = out != NULL ? *out : NULL;
    for (;;) {
        const unsigned char *run = p;
        for (;;) {
            while (p < end && !stops[*p])
                p++;
            if (p >= end || *p < 0x80)
                break;
            do { /* a run of multi-byte characters */
                unsigned char b0 = *p;
                if (b0 >= 0xe1 && b0 <= 0xef && b0 != 0xed && end - p >= 3
                    && (p[1] & 0xc0) == 0x80 && (p[2] & 0xc0) == 0x80) {
                    p += 3; /* kana and kanji: a 3-byte lead with no constraint on its second byte */
                    continue;
                }
                uint32_t cp;
                int n = utf8_decode(p, end - p, &cp);
                if (n == 0)
                    return -1; /* not UTF-8 */
                p += n;
            } while (p < end && *p >= 0x80);
        }
        if (o != NULL) {
            memcpy(o, run, (size_t)(p - run));
            o += p - run;
        }
        if (p >= end || *p < 0x20)
            return -1; /* cut, or a control character */
        if (*p == '"') {
            c->p = p + 1;
            if (out != NULL)
                *out = o;
            return 0;
        }
        /* a backslash */
        if (end - p < 2)
            return -1;
        unsigned char e = p[1], plain = 0;
        unsigned cp;
        switch (e) {
        case '"': plain = '"'; break;
        case '\\': plain = '\\'; break;
        case '/': plain = '/'; break;
        case 'b': plain = '\b'; break;
        case 'f': plain = '\f'; break;
        case 'n': plain = '\n'; break;
        case 'r': plain = '\r'; break;
        case 't': plain = '\t'; break;
        case 'u':
            if (end - p < 6 || hex4(p + 2, &cp) < 0)
                return -1;
            p += 6;
            if (cp >= 0xdc00 && cp <= 0xdfff)
                return -1; /* a lone low surrogate */
            if (cp >= 0xd800 && cp <= 0xdbff) {
                unsigned low;
                if (end - p < 6 || p[0] != '\\' || p[1] != 'u' || hex4(p + 2, &low) < 0 || low < 0xdc00 || low > 0xdfff)
                    return -1; /* a lone high surrogate */
                p += 6;
                cp = 0x10000 + ((cp - 0xd800) << 10) + (low - 0xdc00);
            }
            if (o != NULL)
                o = put_utf8(o, cp);
            continue;
        default:
            return -1;
        }
        if (o != NULL)
            *o++ = plain;
        p += 2;
    }
}

/* A JSON number (the grammar, nothing else): -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?
 * Sets *integer when it has no fraction and no exponent. Returns -1 to bail. */
static int skip_number(Cursor *c, int *integer)
{
    const unsigned char *p = c->p, *end = c->end;
    *integer = 1;
    if (p < end && *p == '-')
        p++;
    if (p >= end)
        return -1;
    if (*p == '0') {
        p++;
    } else if (*p >= '1' && *p <= '9') {
        while (p < end && *p >= '0' && *p <= '9')
            p++;
    } else {
        return -1;
    }
    if (p < end && *p == '.') {
        *integer = 0;
        p++;
        if (p >= end || *p < '0' || *p > '9')
            return -1;
        while (p < end && *p >= '0' && *p <= '9')
            p++;
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        *integer = 0;
        p++;
        if (p < end && (*p == '+' || *p == '-'))
            p++;
        if (p >= end || *p < '0' || *p > '9')
            return -1;
        while (p < end && *p >= '0' && *p <= '9')
            p++;
    }
    c->p = p;
    return 0;
}

static int skip_literal(Cursor *c, const char *word, size_t n)
{
    if ((size_t)(c->end - c->p) < n || memcmp(c->p, word, n) != 0)
        return -1;
    c->p += n;
    return 0;
}

static int skip_value(Cursor *c, int depth);

/* The members or elements after an opening '{' or '['. */
static int skip_container(Cursor *c, int depth, unsigned char close)
{
    if (depth > MAX_DEPTH)
        return -1;
    c->p++;
    skip_space(c);
    if (c->p < c->end && *c->p == close) {
        c->p++;
        return 0;
    }
    for (;;) {
        if (close == '}') {
            if (c->p >= c->end || *c->p != '"' || read_string(c, NULL) < 0)
                return -1;
            skip_space(c);
            if (c->p >= c->end || *c->p != ':')
                return -1;
            c->p++;
            skip_space(c);
        }
        if (skip_value(c, depth + 1) < 0)
            return -1;
        skip_space(c);
        if (c->p >= c->end)
            return -1;
        if (*c->p == close) {
            c->p++;
            return 0;
        }
        if (*c->p != ',')
            return -1;
        c->p++;
        skip_space(c);
    }
}

static int skip_value(Cursor *c, int depth)
{
    int integer;
    if (c->p >= c->end)
        return -1;
    switch (*c->p) {
    case '"': return read_string(c, NULL);
    case '{': return skip_container(c, depth, '}');
    case '[': return skip_container(c, depth, ']');
    case 't': return skip_literal(c, "true", 4);
    case 'f': return skip_literal(c, "false", 5);
    case 'n': return skip_literal(c, "null", 4);
    default: return skip_number(c, &integer);
    }
}

enum { F_OTHER, F_TEXT, F_ID, F_TITLE, F_URL };

typedef struct {
    /* the text column */
    unsigned char *chars;
    Py_ssize_t chars_len;
    int32_t *offsets;
    Py_ssize_t num_rows, offsets_cap;
    PyObject *ids, *titles, *urls;
    unsigned char *scratch; /* an id, title or url, unescaped */
    const unsigned char *text_field;
    Py_ssize_t text_field_len;
} Out;

static int field_of(const Out *out, const unsigned char *key, Py_ssize_t n)
{
    if (n == out->text_field_len && memcmp(key, out->text_field, (size_t)n) == 0)
        return F_TEXT;
    if (n == 2 && memcmp(key, "id", 2) == 0)
        return F_ID;
    if (n == 5 && memcmp(key, "title", 5) == 0)
        return F_TITLE;
    if (n == 3 && memcmp(key, "url", 3) == 0)
        return F_URL;
    return F_OTHER;
}

/* A string value (or, with allow_int, the digits of an integer) as a new str; a null as
 * `if_null` (a new reference); NULL with no exception to bail, NULL with one on error. */
static PyObject *read_field(Cursor *c, Out *out, int allow_int, PyObject *if_null)
{
    if (c->p >= c->end)
        return NULL;
    if (*c->p == '"') {
        unsigned char *end = out->scratch;
        if (read_string(c, &end) < 0)
            return NULL;
        return PyUnicode_DecodeUTF8((const char *)out->scratch, end - out->scratch, "strict");
    }
    if (*c->p == 'n') {
        if (skip_literal(c, "null", 4) < 0)
            return NULL;
        Py_INCREF(if_null);
        return if_null;
    }
    if (allow_int && (*c->p == '-' || (*c->p >= '0' && *c->p <= '9'))) {
        const unsigned char *start = c->p;
        int integer;
        if (skip_number(c, &integer) < 0 || !integer)
            return NULL;
        Py_ssize_t n = c->p - start;
        if (n - (*start == '-') > MAX_ID_DIGITS || (n == 2 && start[0] == '-' && start[1] == '0'))
            return NULL; /* str(int(...)) would not be these digits ("-0"), or might not fit */
        return PyUnicode_FromStringAndSize((const char *)start, n);
    }
    return NULL;
}

static int add_offset(Out *out)
{
    if (out->num_rows + 1 >= out->offsets_cap) {
        Py_ssize_t cap = out->offsets_cap * 2;
        int32_t *grown = realloc(out->offsets, (size_t)cap * sizeof(int32_t));
        if (grown == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        out->offsets = grown;
        out->offsets_cap = cap;
    }
    out->offsets[++out->num_rows] = (int32_t)out->chars_len;
    return 0;
}

/* One line's object, from its '{'. Returns 0, 1 to bail, -1 on error (an exception set). */
static int read_object(Cursor *c, Out *out)
{
    PyObject *fields[5] = {NULL, NULL, NULL, NULL, NULL};
    int seen_text = 0, status = 1;
    c->p++;
    skip_space(c);
    if (c->p < c->end && *c->p == '}')
        goto done; /* no text field */
    for (;;) {
        if (c->p >= c->end || *c->p != '"')
            goto done;
        unsigned char *key_end = out->scratch; /* the key unescaped: "te\\u0078t" is "text" */
        if (read_string(c, &key_end) < 0)
            goto done;
        int field = field_of(out, out->scratch, key_end - out->scratch);
        skip_space(c);
        if (c->p >= c->end || *c->p != ':')
            goto done;
        c->p++;
        skip_space(c);
        if (field == F_TEXT) {
            if (seen_text || c->p >= c->end || *c->p != '"')
                goto done;
            unsigned char *end = out->chars + out->chars_len;
            if (read_string(c, &end) < 0)
                goto done;
            out->chars_len = end - out->chars;
            seen_text = 1;
        } else if (field != F_OTHER) {
            if (fields[field] != NULL)
                goto done; /* named twice */
            PyObject *empty = field == F_ID ? Py_None : PyUnicode_FromStringAndSize("", 0);
            if (empty == NULL) {
                status = -1;
                goto done;
            }
            fields[field] = read_field(c, out, field == F_ID, empty);
            if (field != F_ID)
                Py_DECREF(empty);
            if (fields[field] == NULL) {
                status = PyErr_Occurred() ? -1 : 1;
                goto done;
            }
        } else if (skip_value(c, 1) < 0) {
            goto done;
        }
        skip_space(c);
        if (c->p >= c->end)
            goto done;
        if (*c->p == '}') {
            c->p++;
            break;
        }
        if (*c->p != ',')
            goto done;
        c->p++;
        skip_space(c);
    }
    skip_space(c);
    if (!seen_text || (c->p < c->end && *c->p != '\n'))
        goto done; /* no text, or more than one object on the line */
    if (out->chars_len > INT32_MAX) {
        status = 1;
        goto done;
    }
    PyObject *lists[3] = {out->ids, out->titles, out->urls};
    for (int i = 0; i < 3; i++) {
        PyObject *value = fields[F_ID + i];
        if (value == NULL) {
            value = i == 0 ? Py_None : PyUnicode_FromStringAndSize("", 0);
            if (value == NULL) {
                status = -1;
                goto done;
            }
            if (i == 0)
                Py_INCREF(value);
        } else {
            fields[F_ID + i] = NULL;
        }
        int failed = PyList_Append(lists[i], value);
        Py_DECREF(value);
        if (failed) {
            status = -1;
            goto done;
        }
    }
    status = add_offset(out) < 0 ? -1 : 0;
done:
    for (int i = 0; i < 5; i++)
        Py_XDECREF(fields[i]);
    return status;
}

static PyObject *scan(PyObject *self, PyObject *args)
{
    Py_buffer data, text_field;
    if (!PyArg_ParseTuple(args, "y*y*", &data, &text_field))
        return NULL;
    PyObject *result = NULL, *chars = NULL;
    Out out = {0};
    out.text_field = text_field.buf;
    out.text_field_len = text_field.len;
    out.offsets_cap = 1024;
    out.offsets = malloc((size_t)out.offsets_cap * sizeof(int32_t));
    /* written in place, then cut to length: no copy of the texts */
    chars = PyBytes_FromStringAndSize(NULL, data.len);
    out.chars = chars != NULL ? (unsigned char *)PyBytes_AS_STRING(chars) : NULL;
    out.scratch = malloc((size_t)data.len + 1);
    out.ids = PyList_New(0);
    out.titles = PyList_New(0);
    out.urls = PyList_New(0);
    if (chars == NULL || out.ids == NULL || out.titles == NULL || out.urls == NULL)
        goto finish;
    if (out.offsets == NULL || out.scratch == NULL) {
        PyErr_NoMemory();
        goto finish;
    }
    out.offsets[0] = 0;
    Cursor c = {data.buf, (const unsigned char *)data.buf + data.len};
    while (c.p < c.end) {
        if (*c.p == '\n') { /* an empty line */
            c.p++;
            continue;
        }
        if (*c.p != '{')
            goto bail;
        int status = read_object(&c, &out);
        if (status < 0)
            goto finish;
        if (status > 0)
            goto bail;
        if (c.p < c.end)
            c.p++; /* the newline */
    }
    PyObject *offsets = PyBytes_FromStringAndSize((const char *)out.offsets, (out.num_rows + 1) * (Py_ssize_t)sizeof(int32_t));
    if (offsets != NULL && _PyBytes_Resize(&chars, out.chars_len) == 0)
        result = PyTuple_Pack(5, offsets, chars, out.ids, out.titles, out.urls);
    Py_XDECREF(offsets);
    goto finish;
bail:
    result = Py_None;
    Py_INCREF(result);
finish:
    free(out.offsets);
    free(out.scratch);
    Py_XDECREF(chars);
    Py_XDECREF(out.ids);
    Py_XDECREF(out.titles);
    Py_XDECREF(out.urls);
    PyBuffer_Release(&data);
    PyBuffer_Release(&text_field);
    return result;
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_VARARGS,
     "scan(data, text_field) -> (offsets, chars, ids, titles, urls) or None: the documents of whole "
     "JSON lines (see the module's source)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_jsonlines", NULL, -1, methods};

PyMODINIT_FUNC PyInit__jsonlines(void)
{
    init_stops();
    return PyModule_Create(&module);
}
