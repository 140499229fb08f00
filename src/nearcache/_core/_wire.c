/* The message codec's common cases in C (optional; _core/codec.py is the reference).

   encode(): one message of key / region / clear operations, unsigned, as bytes.
   decode(): the operations of one message, from the first operation to ``end``.
   key_entries(): the outbox's queue entries for staged key invalidations (see outbox.py).

   encode() and decode() handle only what the hot paths meet: exact str / bytes / int keys,
   str or None regions, no UPDATE operations. For anything else, or any malformed byte, they
   return None and the caller runs the Python codec, which produces the same result or the
   precise MessageError: a malformed message costs two decodes, a valid one never more than
   this one. The differential tests in tests/test_wire.py hold both codecs to the same bytes
   and results.
*/
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#define API_VERSION 2
#define HEADER_SIZE 32
#define DEFAULT_REGION 0xFFFF
#define KEY_STR 1
#define KEY_BYTES 2
#define KEY_INT 3
#define MAX_INT_KEY_CHARS 4000
#define OP_KEY 1
#define OP_REGION 2
#define OP_CLEAR 3

/* Set once by configure(): the Invalidation type and the Kind members. */
static PyTypeObject *invalidation_type = NULL;
static PyObject *kind_key = NULL, *kind_region = NULL, *kind_clear = NULL;

/* -- a growing output buffer ------------------------------------------------------------ */

typedef struct {
    char *data;
    Py_ssize_t len, cap;
} Out;

static int out_reserve(Out *out, Py_ssize_t more) {
    if (out->len + more <= out->cap) return 0;
    Py_ssize_t cap = out->cap ? out->cap : 256;
    while (cap < out->len + more) cap *= 2;
    char *data = PyMem_Realloc(out->data, (size_t)cap);
    if (data == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    out->data = data;
    out->cap = cap;
    return 0;
}

static int out_put(Out *out, const void *src, Py_ssize_t n) {
    if (out_reserve(out, n) < 0) return -1;
    memcpy(out->data + out->len, src, (size_t)n);
    out->len += n;
    return 0;
}

static void put_u16(unsigned char *p, unsigned v) {
    p[0] = (unsigned char)(v >> 8);
    p[1] = (unsigned char)v;
}

static void put_u32(unsigned char *p, unsigned long v) {
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

/* 1: encoded; 0: not handled here (the Python codec decides); -1: an exception is set. */
static int put_region(Out *out, PyObject *region) {
    unsigned char head[2];
    if (region == Py_None) {
        put_u16(head, DEFAULT_REGION);
        return out_put(out, head, 2) < 0 ? -1 : 1;
    }
    if (!PyUnicode_CheckExact(region)) return 0;
    Py_ssize_t n;
    const char *raw = PyUnicode_AsUTF8AndSize(region, &n);
    if (raw == NULL) {
        PyErr_Clear();
        return 0;
    }
    if (n >= DEFAULT_REGION) return 0;
    put_u16(head, (unsigned)n);
    if (out_put(out, head, 2) < 0 || out_put(out, raw, n) < 0) return -1;
    return 1;
}

static int put_key(Out *out, PyObject *key) {
    unsigned char head[5];
    const char *raw;
    Py_ssize_t n;
    PyObject *text = NULL;
    if (PyUnicode_CheckExact(key)) {
        raw = PyUnicode_AsUTF8AndSize(key, &n);
        if (raw == NULL) {
            PyErr_Clear();
            return 0;
        }
        head[0] = KEY_STR;
    } else if (PyBytes_CheckExact(key)) {
        raw = PyBytes_AS_STRING(key);
        n = PyBytes_GET_SIZE(key);
        head[0] = KEY_BYTES;
    } else if (PyLong_CheckExact(key)) {
        text = PyObject_Str(key);
        if (text == NULL) {
            PyErr_Clear();
            return 0;
        }
        raw = PyUnicode_AsUTF8AndSize(text, &n);
        if (raw == NULL || n > MAX_INT_KEY_CHARS) {
            PyErr_Clear();
            Py_DECREF(text);
            return 0;
        }
        head[0] = KEY_INT;
    } else {
        return 0;
    }
    if ((unsigned long long)n > 0xFFFFFFFFULL) {
        Py_XDECREF(text);
        return 0;
    }
    put_u32(head + 1, (unsigned long)n);
    int failed = out_put(out, head, 5) < 0 || out_put(out, raw, n) < 0;
    Py_XDECREF(text);
    return failed ? -1 : 1;
}

static PyObject *encode(PyObject *module, PyObject *args) {
    Py_buffer sender;
    unsigned long long sequence;
    PyObject *ops;
    int flags;
    if (!PyArg_ParseTuple(args, "y*KO!i", &sender, &sequence, &PyList_Type, &ops, &flags))
        return NULL;
    PyObject *result = NULL;
    Out out = {NULL, 0, 0};
    Py_ssize_t count = PyList_GET_SIZE(ops);
    if (sender.len != 16 || count > 0xFFFFFFFFLL) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    unsigned char header[HEADER_SIZE];
    header[0] = 'N';
    header[1] = 'C';
    header[2] = 1;
    header[3] = (unsigned char)flags;
    memcpy(header + 4, sender.buf, 16);
    for (int i = 0; i < 8; i++) header[20 + i] = (unsigned char)(sequence >> (8 * (7 - i)));
    put_u32(header + 28, (unsigned long)count);
    if (out_reserve(&out, HEADER_SIZE + count * 24) < 0 || out_put(&out, header, HEADER_SIZE) < 0)
        goto done;
    PyObject *last_region = NULL; /* borrowed: regions repeat, encode each run once */
    Py_ssize_t last_head = 0, last_head_len = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *op = PyList_GET_ITEM(ops, i);
        if (!PyTuple_Check(op) || PyTuple_GET_SIZE(op) != 3) goto unhandled;
        PyObject *kind = PyTuple_GET_ITEM(op, 0);
        unsigned char code;
        if (kind == kind_key) code = OP_KEY;
        else if (kind == kind_region) code = OP_REGION;
        else if (kind == kind_clear) code = OP_CLEAR;
        else goto unhandled;
        if (out_put(&out, &code, 1) < 0) goto done;
        if (code == OP_CLEAR) continue;
        PyObject *region = PyTuple_GET_ITEM(op, 1);
        if (region == last_region && last_region != NULL) {
            if (out_reserve(&out, last_head_len) < 0) goto done;
            memcpy(out.data + out.len, out.data + last_head, (size_t)last_head_len);
            out.len += last_head_len;
        } else {
            Py_ssize_t at = out.len;
            int got = put_region(&out, region);
            if (got < 0) goto done;
            if (got == 0) goto unhandled;
            last_region = region;
            last_head = at;
            last_head_len = out.len - at;
        }
        if (code == OP_KEY) {
            int got = put_key(&out, PyTuple_GET_ITEM(op, 2));
            if (got < 0) goto done;
            if (got == 0) goto unhandled;
        }
    }
    result = PyBytes_FromStringAndSize(out.data, out.len);
    goto done;
unhandled:
    result = Py_NewRef(Py_None);
done:
    PyMem_Free(out.data);
    PyBuffer_Release(&sender);
    return result;
}

/* -- decoding ---------------------------------------------------------------------------- */

static PyObject *new_op(PyObject *kind, PyObject *region, PyObject *key) {
    /* What tuple.__new__(Invalidation, (kind, region, key)) makes, without the call. */
    PyObject *op = invalidation_type->tp_alloc(invalidation_type, 3);
    if (op == NULL) return NULL;
    PyTuple_SET_ITEM(op, 0, Py_NewRef(kind));
    PyTuple_SET_ITEM(op, 1, Py_NewRef(region));
    PyTuple_SET_ITEM(op, 2, Py_NewRef(key));
    return op;
}

static unsigned read_u16(const unsigned char *p) { return ((unsigned)p[0] << 8) | p[1]; }

static unsigned long read_u32(const unsigned char *p) {
    return ((unsigned long)p[0] << 24) | ((unsigned long)p[1] << 16) | ((unsigned long)p[2] << 8) |
           p[3];
}

/* A canonical decimal int key (str(int) form), or NULL without an exception when it is not. */
static PyObject *int_key(const unsigned char *raw, Py_ssize_t n) {
    if (n == 0 || n > MAX_INT_KEY_CHARS) return NULL;
    Py_ssize_t start = raw[0] == '-' ? 1 : 0;
    if (start == n) return NULL;
    for (Py_ssize_t i = start; i < n; i++)
        if (raw[i] < '0' || raw[i] > '9') return NULL;
    if (raw[start] == '0' && !(n == 1)) return NULL; /* "007", "-0" */
    char buffer[MAX_INT_KEY_CHARS + 1];
    memcpy(buffer, raw, (size_t)n);
    buffer[n] = '\0';
    PyObject *value = PyLong_FromString(buffer, NULL, 10);
    if (value == NULL) PyErr_Clear();
    return value;
}

static PyObject *decode(PyObject *module, PyObject *args) {
    Py_buffer view;
    Py_ssize_t pos, end, count;
    if (!PyArg_ParseTuple(args, "y*nnn", &view, &pos, &end, &count)) return NULL;
    const unsigned char *data = view.buf;
    PyObject *ops = NULL, *region = NULL, *result = NULL;
    const unsigned char *region_raw = NULL; /* bytes of the region decoded last */
    Py_ssize_t region_len = -1;
    if (end > view.len || pos < 0 || count < 0 || count > end - pos) goto unhandled;
    ops = PyTuple_New(count);
    if (ops == NULL) goto done;
    for (Py_ssize_t i = 0; i < count; i++) {
        if (pos >= end) goto unhandled;
        unsigned char code = data[pos++];
        if (code == OP_CLEAR) {
            PyObject *op = new_op(kind_clear, Py_None, Py_None);
            if (op == NULL) goto done;
            PyTuple_SET_ITEM(ops, i, op);
            continue;
        }
        if (code != OP_KEY && code != OP_REGION) goto unhandled;
        if (pos + 2 > end) goto unhandled;
        unsigned length = read_u16(data + pos);
        pos += 2;
        if (length == DEFAULT_REGION) {
            if (region_len != -2) {
                Py_XDECREF(region);
                region = Py_NewRef(Py_None);
                region_len = -2; /* marks None */
            }
        } else {
            if (pos + (Py_ssize_t)length > end) goto unhandled;
            if (region_len != (Py_ssize_t)length || region_raw == NULL ||
                memcmp(region_raw, data + pos, length) != 0) {
                PyObject *decoded = PyUnicode_DecodeUTF8((const char *)data + pos, length, NULL);
                if (decoded == NULL) {
                    PyErr_Clear();
                    goto unhandled;
                }
                Py_XSETREF(region, decoded);
                region_raw = data + pos;
                region_len = length;
            }
            pos += length;
        }
        if (code == OP_REGION) {
            PyObject *op = new_op(kind_region, region, Py_None);
            if (op == NULL) goto done;
            PyTuple_SET_ITEM(ops, i, op);
            continue;
        }
        if (pos + 5 > end) goto unhandled;
        unsigned char key_type = data[pos];
        unsigned long key_len = read_u32(data + pos + 1);
        pos += 5;
        if ((unsigned long long)key_len > (unsigned long long)(end - pos)) goto unhandled;
        PyObject *key;
        const unsigned char *raw = data + pos;
        if (key_type == KEY_STR) {
            key = PyUnicode_DecodeUTF8((const char *)raw, (Py_ssize_t)key_len, NULL);
            if (key == NULL) {
                PyErr_Clear();
                goto unhandled;
            }
        } else if (key_type == KEY_BYTES) {
            key = PyBytes_FromStringAndSize((const char *)raw, (Py_ssize_t)key_len);
            if (key == NULL) goto done;
        } else if (key_type == KEY_INT) {
            key = int_key(raw, (Py_ssize_t)key_len);
            if (key == NULL) goto unhandled;
        } else {
            goto unhandled;
        }
        pos += (Py_ssize_t)key_len;
        PyObject *op = new_op(kind_key, region, key);
        Py_DECREF(key);
        if (op == NULL) goto done;
        PyTuple_SET_ITEM(ops, i, op);
    }
    if (pos != end) goto unhandled;
    result = Py_NewRef(ops);
    goto done;
unhandled:
    result = Py_NewRef(Py_None);
done:
    Py_XDECREF(ops);
    Py_XDECREF(region);
    PyBuffer_Release(&view);
    return result;
}

/* key_entries(seq, idents): [(seq, Invalidation(KEY, region, key)) for region, key in idents]. */
static PyObject *key_entries(PyObject *module, PyObject *args) {
    PyObject *seq, *idents;
    if (!PyArg_ParseTuple(args, "O!O!", &PyLong_Type, &seq, &PyList_Type, &idents)) return NULL;
    if (invalidation_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "_wire.configure() was not called");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(idents);
    PyObject *entries = PyList_New(n);
    if (entries == NULL) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *ident = PyList_GET_ITEM(idents, i);
        if (!PyTuple_CheckExact(ident) || PyTuple_GET_SIZE(ident) != 2) {
            PyErr_SetString(PyExc_TypeError, "an ident must be a (region, key) tuple");
            Py_DECREF(entries);
            return NULL;
        }
        PyObject *op = new_op(kind_key, PyTuple_GET_ITEM(ident, 0), PyTuple_GET_ITEM(ident, 1));
        if (op == NULL) {
            Py_DECREF(entries);
            return NULL;
        }
        PyObject *entry = PyTuple_New(2);
        if (entry == NULL) {
            Py_DECREF(op);
            Py_DECREF(entries);
            return NULL;
        }
        PyTuple_SET_ITEM(entry, 0, Py_NewRef(seq));
        PyTuple_SET_ITEM(entry, 1, op);
        PyList_SET_ITEM(entries, i, entry);
    }
    return entries;
}

static PyObject *configure(PyObject *module, PyObject *args) {
    PyObject *type, *key, *region, *clear;
    if (!PyArg_ParseTuple(args, "O!OOO", &PyType_Type, &type, &key, &region, &clear)) return NULL;
    if (!PyType_IsSubtype((PyTypeObject *)type, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "the operation type must be a tuple subclass");
        return NULL;
    }
    Py_XSETREF(invalidation_type, (PyTypeObject *)Py_NewRef(type));
    Py_XSETREF(kind_key, Py_NewRef(key));
    Py_XSETREF(kind_region, Py_NewRef(region));
    Py_XSETREF(kind_clear, Py_NewRef(clear));
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"configure", configure, METH_VARARGS,
     "configure(Invalidation, Kind.KEY, Kind.REGION, Kind.CLEAR): what decode() builds."},
    {"encode", encode, METH_VARARGS,
     "encode(sender, sequence, ops, flags) -> bytes | None: one unsigned message, or None "
     "when an operation needs the Python codec."},
    {"decode", decode, METH_VARARGS,
     "decode(data, pos, end, count) -> tuple | None: the operations, or None when they "
     "need the Python codec (or are malformed)."},
    {"key_entries", key_entries, METH_VARARGS,
     "key_entries(seq, idents) -> list: (seq, Invalidation(KEY, region, key)) for each "
     "(region, key) of idents."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "nearcache._core._wire",
    "The message codec's common cases in C (see _core/codec.py).", -1, methods,
};

PyMODINIT_FUNC PyInit__wire(void) {
    PyObject *module = PyModule_Create(&module_def);
    if (module == NULL) return NULL;
    if (PyModule_AddIntConstant(module, "API", API_VERSION) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
