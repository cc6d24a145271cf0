/*
 * pcigate._cmask: the hot path of pcigate.masking in C, for runs of DataRow messages.
 *
 * It does exactly what pcigate.masking.Masker.mask_datarow does for the common cases, and hands every other
 * case back to that Python code (which stays the reference; tests/unit/test_cmask.py checks the two agree
 * byte for byte with Hypothesis):
 *
 *   - a field scanned for PANs (op PAN) whose digits are never joined by a single space or dash: every
 *     maximal run of 13-19 ASCII digits that passes Luhn gets '*' over all but the first `head` and last
 *     `tail` digits (Masker._mask_value's separator-free branch);
 *   - a redacted field (ops REDACT_*): '*' over the value, keeping JSON quotes (Masker.redact_value);
 *   - a binary int8 or numeric field (ops INT8, NUMERIC) is read as its text form (int8out, numeric_out):
 *     when that text would be masked, the row goes to the Python path (which sends the value as NULL);
 *   - every other field is left alone.
 *
 * A field the fast path cannot decide alone -- digit groups joined by separators that add up to 13+
 * digits, or track data (a '^' or '=' next to a 13+ digit run) when the policy masks tracks -- stops the
 * walk *before* its row, and so does anything malformed (a short body, a field count that differs from the
 * plan, a bad field length): the caller runs the Python code on that one row, which masks it or raises.
 * Masking keeps every length, so no frame is rewritten.
 *
 * mask_copydata(buf, pos, head, tail, track) -> (bytearray | None, stop)
 *   the same for a run of CopyData messages of a text/CSV COPY OUT, each payload scanned whole as
 *   Masker.mask_copy_data does; a payload that needs Python stops the walk before it.
 *
 * mask_datarows(buf, pos, ops, head, tail, track) -> (bytearray | None, stop)
 *   buf:  bytes-like holding whole protocol messages from offset pos (a partial one may follow);
 *   ops:  one byte per column: 0 skip, 1 PAN scan, 2 redact text, 3 redact JSON text, 4 redact jsonb binary,
 *         5 binary int8, 6 binary numeric;
 *   returns the masked copy of buf[pos:stop] (None when nothing changed) and stop, the offset of the first
 *   message not handled: not a DataRow, incomplete, or a row for the Python path.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define MIN_PAN 13
#define MAX_PAN 19
#define MAX_MESSAGE (1u << 30) /* pcigate.wire.pg.MAX_MESSAGE */

enum { OP_SKIP = 0, OP_PAN = 1, OP_REDACT_TEXT = 2, OP_REDACT_JSON = 3, OP_REDACT_JSONB = 4, OP_INT8 = 5,
       OP_NUMERIC = 6 };
#define NUMBER_TEXT_MAX 256 /* longer numeric texts are left to Python */
enum { V_NONE = 0, V_MASK = 1, V_SLOW = 2 };

static inline int is_digit(uint8_t c) { return c >= '0' && c <= '9'; }
static inline int is_sep(uint8_t c) { return c == ' ' || c == '-'; }

static inline uint32_t be32(const uint8_t *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | (uint32_t)p[3];
}

static int luhn_ok(const uint8_t *d, Py_ssize_t n) {
    int total = 0, dbl = 0;
    for (Py_ssize_t i = n - 1; i >= 0; i--) {
        int x = d[i] - '0';
        if (dbl) {
            x *= 2;
            if (x > 9) x -= 9;
        }
        total += x;
        dbl = !dbl;
    }
    return total % 10 == 0;
}

/* What the PAN scan of one value needs: nothing, the contiguous-run mask, or the Python path. */
static int classify_value(const uint8_t *v, Py_ssize_t n, int track) {
    int joined = 0;      /* a digit, one separator, a digit ("0-0" in Masker's class string) */
    int long_run = 0;    /* a maximal digit run of 13+ */
    int seg_long = 0;    /* 13+ digits in a stretch of only digits and separators */
    int has_track = 0;   /* '^' or '=' anywhere */
    Py_ssize_t run = 0, seg = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint8_t c = v[i];
        if (is_digit(c)) {
            if (++run >= MIN_PAN) long_run = 1;
            if (++seg >= MIN_PAN) seg_long = 1;
            continue;
        }
        run = 0;
        if (is_sep(c)) {
            if (i > 0 && i + 1 < n && is_digit(v[i - 1]) && is_digit(v[i + 1])) joined = 1;
            continue;
        }
        seg = 0;
        if (c == '^' || c == '=') has_track = 1;
    }
    if (joined) return seg_long ? V_SLOW : V_NONE;
    if (!long_run) return V_NONE;
    if (track && has_track) return V_SLOW;
    return V_MASK;
}

/* The text of a binary int8 (int8out) into out; its length. */
static Py_ssize_t int8_text(const uint8_t *v, uint8_t *out) {
    uint64_t u = ((uint64_t)be32(v) << 32) | be32(v + 4);
    int neg = (u >> 63) != 0;
    if (neg) u = ~u + 1; /* the magnitude; INT64_MIN's is 2^63, still exact in uint64 */
    uint8_t tmp[20];
    Py_ssize_t k = 0, n = 0;
    do {
        tmp[k++] = (uint8_t)('0' + u % 10);
        u /= 10;
    } while (u);
    if (neg) out[n++] = '-';
    while (k) out[n++] = tmp[--k];
    return n;
}

/* The text of a binary numeric (numeric_out) into out[NUMBER_TEXT_MAX]; its length, 0 for NaN and the
   infinities, -1 when malformed or longer than NUMBER_TEXT_MAX (the Python path decides then). */
static Py_ssize_t numeric_text(const uint8_t *v, Py_ssize_t n, uint8_t *out) {
    if (n < 8) return -1;
    int ndigits = (int16_t)((v[0] << 8) | v[1]);
    int weight = (int16_t)((v[2] << 8) | v[3]);
    unsigned sign = (unsigned)((v[4] << 8) | v[5]);
    int dscale = (int16_t)((v[6] << 8) | v[7]);
    if (sign == 0xC000 || sign == 0xD000 || sign == 0xF000) return 0;
    if (ndigits < 0 || n != 8 + 2 * (Py_ssize_t)ndigits || (sign != 0 && sign != 0x4000) || dscale < 0) return -1;
    Py_ssize_t len = (sign ? 1 : 0) + (weight < 0 ? 1 : 4 * ((Py_ssize_t)weight + 1)) + (dscale ? 1 + dscale : 0);
    if (len > NUMBER_TEXT_MAX) return -1;
    for (int d = 0; d < ndigits; d++) {
        int g = (int16_t)((v[8 + 2 * d] << 8) | v[9 + 2 * d]);
        if (g < 0 || g > 9999) return -1;
    }
    Py_ssize_t k = 0;
    if (sign) out[k++] = '-';
    if (weight < 0) {
        out[k++] = '0';
    } else {
        for (int d = 0; d <= weight; d++) {
            int g = d < ndigits ? (int16_t)((v[8 + 2 * d] << 8) | v[9 + 2 * d]) : 0;
            uint8_t q[4] = {(uint8_t)('0' + g / 1000), (uint8_t)('0' + g / 100 % 10), (uint8_t)('0' + g / 10 % 10),
                            (uint8_t)('0' + g % 10)};
            int first = 0;
            if (d == 0) while (first < 3 && q[first] == '0') first++; /* the first group without leading zeros */
            for (int i = first; i < 4; i++) out[k++] = q[i];
        }
    }
    if (dscale > 0) {
        out[k++] = '.';
        int left = dscale;
        for (int d = weight + 1; left > 0; d++) {
            int g = (d >= 0 && d < ndigits) ? (int16_t)((v[8 + 2 * d] << 8) | v[9 + 2 * d]) : 0;
            uint8_t q[4] = {(uint8_t)('0' + g / 1000), (uint8_t)('0' + g / 100 % 10), (uint8_t)('0' + g / 10 % 10),
                            (uint8_t)('0' + g % 10)};
            for (int i = 0; i < 4 && left > 0; i++, left--) out[k++] = q[i];
        }
    }
    return k;
}

static int mask_runs(const uint8_t *src, uint8_t *dst, Py_ssize_t n, int head, int tail);

/* Whether a binary int8/numeric value's text would be masked: 0 no, 1 yes or undecided (Python's). */
static int number_needs_python(const uint8_t *v, Py_ssize_t n, int op) {
    uint8_t text[NUMBER_TEXT_MAX];
    Py_ssize_t len;
    if (op == OP_INT8) {
        if (n != 8) return 1;
        len = int8_text(v, text);
    } else {
        len = numeric_text(v, n, text);
        if (len < 0) return 1;
    }
    if (len < MIN_PAN) return 0;
    int c = classify_value(text, len, 0);
    if (c == V_NONE) return 0;
    if (c == V_SLOW) return 1;
    return mask_runs(text, NULL, len, 0, 0);
}

/* Mask every maximal digit run of 13-19 that passes Luhn (read from src, written to dst). */
static int mask_runs(const uint8_t *src, uint8_t *dst, Py_ssize_t n, int head, int tail) {
    int changed = 0;
    Py_ssize_t i = 0;
    while (i < n) {
        if (!is_digit(src[i])) {
            i++;
            continue;
        }
        Py_ssize_t j = i;
        while (j < n && is_digit(src[j])) j++;
        Py_ssize_t len = j - i;
        if (len >= MIN_PAN && len <= MAX_PAN && luhn_ok(src + i, len)) {
            if (dst != NULL && len > head + tail) memset(dst + i + head, '*', (size_t)(len - head - tail));
            changed = 1;
        }
        i = j;
    }
    return changed;
}

static void redact(uint8_t *dst, Py_ssize_t n, int op) {
    if (op == OP_REDACT_JSON && n >= 2) {
        dst[0] = '"';
        memset(dst + 1, '*', (size_t)(n - 2));
        dst[n - 1] = '"';
    } else if (op == OP_REDACT_JSONB && n >= 3) {
        dst[0] = 1;
        dst[1] = '"';
        memset(dst + 2, '*', (size_t)(n - 3));
        dst[n - 1] = '"';
    } else {
        memset(dst, '*', (size_t)n);
    }
}

/* Does redacting change this value? (Masker adds an edit only when the value differs.) */
static int redact_changes(const uint8_t *v, Py_ssize_t n, int op) {
    Py_ssize_t lo = 0, hi = n;
    if (op == OP_REDACT_JSON && n >= 2) {
        if (v[0] != '"' || v[n - 1] != '"') return 1;
        lo = 1, hi = n - 1;
    } else if (op == OP_REDACT_JSONB && n >= 3) {
        if (v[0] != 1 || v[1] != '"' || v[n - 1] != '"') return 1;
        lo = 2, hi = n - 1;
    }
    for (Py_ssize_t i = lo; i < hi; i++)
        if (v[i] != '*') return 1;
    return 0;
}

/* The copy of src[start:end] written into at the first change; returns dst indexed like src, or NULL. */
static uint8_t *copy_out(const uint8_t *src, Py_ssize_t start, Py_ssize_t end, PyObject **out) {
    *out = PyByteArray_FromStringAndSize((const char *)src + start, end - start);
    if (*out == NULL) return NULL;
    return (uint8_t *)PyByteArray_AS_STRING(*out) - start;
}

/* (the copy cut to src[start:stop] or None when nothing changed, stop) */
static PyObject *walk_result(PyObject *out, Py_ssize_t start, Py_ssize_t stop) {
    if (out == NULL) return Py_BuildValue("(On)", Py_None, stop);
    if (PyByteArray_Resize(out, stop - start) < 0) {
        Py_DECREF(out);
        return NULL;
    }
    return Py_BuildValue("(Nn)", out, stop);
}

static PyObject *mask_datarows(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer buf, ops;
    Py_ssize_t pos;
    int head, tail, track;
    if (!PyArg_ParseTuple(args, "y*ny*iip", &buf, &pos, &ops, &head, &tail, &track)) return NULL;
    const uint8_t *src = (const uint8_t *)buf.buf;
    const uint8_t *op = (const uint8_t *)ops.buf;
    Py_ssize_t end = buf.len, nops = ops.len, start = pos;
    uint8_t *dst = NULL; /* the copy of src[start:end], made at the first change */
    PyObject *out = NULL;

    if (pos < 0 || pos > end || head < 0 || tail < 0) {
        PyBuffer_Release(&buf);
        PyBuffer_Release(&ops);
        PyErr_SetString(PyExc_ValueError, "bad arguments");
        return NULL;
    }
    while (pos + 5 <= end && src[pos] == 'D') {
        uint32_t mlen = be32(src + pos + 1);
        if (mlen < 4 || mlen > MAX_MESSAGE || (Py_ssize_t)mlen > end - pos - 1) break;
        Py_ssize_t body = pos + 5, next = pos + 1 + (Py_ssize_t)mlen;
        if (next - body < 2) break;
        int16_t count = (int16_t)((src[body] << 8) | src[body + 1]);
        if (count != nops) break;
        /* first pass: decide; a row that needs Python stops the walk before it */
        int slow = 0, work = 0;
        Py_ssize_t p = body + 2;
        for (Py_ssize_t f = 0; f < nops; f++) {
            if (p + 4 > next) { slow = 1; break; }
            int32_t flen = (int32_t)be32(src + p);
            p += 4;
            if (flen < 0) {
                if (flen != -1) { slow = 1; break; }
                continue;
            }
            if (flen > next - p) { slow = 1; break; }
            if (op[f] == OP_PAN) {
                if (flen >= MIN_PAN) {
                    int c = classify_value(src + p, flen, track);
                    if (c == V_SLOW) { slow = 1; break; }
                    if (c == V_MASK) work = 1;
                }
            } else if (op[f] == OP_INT8 || op[f] == OP_NUMERIC) {
                if (number_needs_python(src + p, flen, op[f])) { slow = 1; break; }
            } else if (op[f] != OP_SKIP) {
                if (redact_changes(src + p, flen, op[f])) work = 1;
            }
            p += flen;
        }
        if (slow || p != next) break;
        if (work) {
            if (dst == NULL && (dst = copy_out(src, start, end, &out)) == NULL) goto fail;
            p = body + 2;
            for (Py_ssize_t f = 0; f < nops; f++) {
                int32_t flen = (int32_t)be32(src + p);
                p += 4;
                if (flen < 0) continue;
                if (op[f] == OP_PAN) {
                    if (flen >= MIN_PAN && classify_value(src + p, flen, track) == V_MASK)
                        mask_runs(src + p, dst + p, flen, head, tail);
                } else if (op[f] != OP_SKIP && op[f] != OP_INT8 && op[f] != OP_NUMERIC) {
                    if (redact_changes(src + p, flen, op[f])) redact(dst + p, flen, op[f]);
                }
                p += flen;
            }
        }
        pos = next;
    }
    PyBuffer_Release(&buf);
    PyBuffer_Release(&ops);
    return walk_result(out, start, pos);
fail:
    PyBuffer_Release(&buf);
    PyBuffer_Release(&ops);
    return NULL;
}

static PyObject *mask_copydata(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer buf;
    Py_ssize_t pos;
    int head, tail, track;
    if (!PyArg_ParseTuple(args, "y*niip", &buf, &pos, &head, &tail, &track)) return NULL;
    const uint8_t *src = (const uint8_t *)buf.buf;
    Py_ssize_t end = buf.len, start = pos;
    uint8_t *dst = NULL;
    PyObject *out = NULL;
    if (pos < 0 || pos > end || head < 0 || tail < 0) {
        PyBuffer_Release(&buf);
        PyErr_SetString(PyExc_ValueError, "bad arguments");
        return NULL;
    }
    while (pos + 5 <= end && src[pos] == 'd') {
        uint32_t mlen = be32(src + pos + 1);
        if (mlen < 4 || mlen > MAX_MESSAGE || (Py_ssize_t)mlen > end - pos - 1) break;
        Py_ssize_t body = pos + 5, n = (Py_ssize_t)mlen - 4;
        if (n >= MIN_PAN) {
            int c = classify_value(src + body, n, track);
            if (c == V_SLOW) break;
            if (c == V_MASK) {
                if (dst == NULL && (dst = copy_out(src, start, end, &out)) == NULL) {
                    PyBuffer_Release(&buf);
                    return NULL;
                }
                mask_runs(src + body, dst + body, n, head, tail);
            }
        }
        pos = body + n;
    }
    PyBuffer_Release(&buf);
    return walk_result(out, start, pos);
}

static PyMethodDef methods[] = {
    {"mask_copydata", mask_copydata, METH_VARARGS,
     "mask_copydata(buf, pos, head, tail, track) -> (bytearray | None, stop)"},
    {"mask_datarows", mask_datarows, METH_VARARGS,
     "mask_datarows(buf, pos, ops, head, tail, track) -> (bytearray | None, stop)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_cmask", "pcigate's masking hot path in C.", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__cmask(void) { return PyModule_Create(&module); }
