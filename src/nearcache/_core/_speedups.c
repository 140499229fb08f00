/*
 * nearcache._core._speedups: the L1 hit path in C (optional; _store.py has the same logic in Python).
 *
 * Entry   - one cached value with its timestamps (the fields _store.py reads and writes).
 * Reader  - get(key, default=None, region=None): a dictionary lookup, one clock read and the
 *           staleness rule, without entering the interpreter; aget(...) returns an awaitable
 *           that completes at once, so an asyncio hit never suspends.
 *
 * The rule is the one in _store.py: an entry is served at `now` only while
 * now < expires and (now <= fresh_until or now <= stored + max_staleness).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <time.h>

/* ---------------------------------------------------------------- Entry */

typedef struct {
    PyObject_HEAD
    PyObject *key;
    PyObject *region;
    PyObject *value;
    double stored;
    double expires;
    double deadline;
    double sliding;
    /* 32-bit counters keep the object in a smaller allocation class; they wrap after 4e9
     * hits, which only makes the CLOCK hand see one extra use and the hit count low. */
    unsigned int hits;
    unsigned int mark;
} EntryObject;

static int
Entry_init(EntryObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"key", "region", "value", "stored", "expires", "deadline",
                             "sliding", NULL};
    PyObject *key, *region, *value;
    double stored, expires, deadline, sliding;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOdddd", kwlist, &key, &region, &value,
                                     &stored, &expires, &deadline, &sliding))
        return -1;
    Py_INCREF(key);
    Py_XSETREF(self->key, key);
    Py_INCREF(region);
    Py_XSETREF(self->region, region);
    Py_INCREF(value);
    Py_XSETREF(self->value, value);
    self->stored = stored;
    self->expires = expires;
    self->deadline = deadline;
    self->sliding = sliding;
    self->hits = 0;
    self->mark = 0;
    return 0;
}

static int
Entry_traverse(EntryObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->key);
    Py_VISIT(self->region);
    Py_VISIT(self->value);
    return 0;
}

static int
Entry_clear(EntryObject *self)
{
    Py_CLEAR(self->key);
    Py_CLEAR(self->region);
    Py_CLEAR(self->value);
    return 0;
}

static void
Entry_dealloc(EntryObject *self)
{
    PyObject_GC_UnTrack(self);
    Entry_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMemberDef Entry_members[] = {
    {"key", T_OBJECT, offsetof(EntryObject, key), READONLY, NULL},
    {"region", T_OBJECT, offsetof(EntryObject, region), READONLY, NULL},
    {"value", T_OBJECT, offsetof(EntryObject, value), READONLY, NULL},
    {"stored", T_DOUBLE, offsetof(EntryObject, stored), 0, NULL},
    {"expires", T_DOUBLE, offsetof(EntryObject, expires), 0, NULL},
    {"deadline", T_DOUBLE, offsetof(EntryObject, deadline), 0, NULL},
    {"sliding", T_DOUBLE, offsetof(EntryObject, sliding), 0, NULL},
    {"hits", T_UINT, offsetof(EntryObject, hits), 0, NULL},
    {"mark", T_UINT, offsetof(EntryObject, mark), 0, NULL},
    {NULL},
};

static PyTypeObject EntryType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "nearcache._core._speedups.Entry",
    .tp_basicsize = sizeof(EntryObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "One cached value with its timestamps.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Entry_init,
    .tp_dealloc = (destructor)Entry_dealloc,
    .tp_traverse = (traverseproc)Entry_traverse,
    .tp_clear = (inquiry)Entry_clear,
    .tp_members = Entry_members,
};

/* ---------------------------------------------------------------- Ready */

/* An awaitable whose result is already known: `await` returns it without suspending. */
typedef struct {
    PyObject_HEAD
    PyObject *result;
} ReadyObject;

static PyTypeObject ReadyType;

static void
Ready_dealloc(ReadyObject *self)
{
    Py_XDECREF(self->result);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Ready_await(PyObject *self)
{
    Py_INCREF(self);
    return self;
}

static PyObject *
Ready_next(ReadyObject *self)
{
    PyObject *result = self->result ? self->result : Py_None;
    /* StopIteration(result), built so that a tuple result is not unpacked into args. */
    PyObject *exc = PyObject_CallOneArg(PyExc_StopIteration, result);
    if (exc != NULL) {
        PyErr_SetObject(PyExc_StopIteration, exc);
        Py_DECREF(exc);
    }
    return NULL;
}

#if PY_VERSION_HEX >= 0x030A0000
static PySendResult
Ready_send(ReadyObject *self, PyObject *arg, PyObject **presult)
{
    PyObject *result = self->result ? self->result : Py_None;
    Py_INCREF(result);
    *presult = result;
    return PYGEN_RETURN;
}
#endif

static PyAsyncMethods Ready_async = {
    .am_await = Ready_await,
#if PY_VERSION_HEX >= 0x030A0000
    .am_send = (sendfunc)Ready_send,
#endif
};

static PyTypeObject ReadyType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "nearcache._core._speedups.Ready",
    .tp_basicsize = sizeof(ReadyObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "An awaitable that is already complete.",
    .tp_dealloc = (destructor)Ready_dealloc,
    .tp_as_async = &Ready_async,
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = (iternextfunc)Ready_next,
};

/* ---------------------------------------------------------------- Reader */

typedef struct {
    PyObject_HEAD
    PyObject *default_bucket; /* dict: key -> Entry, the region None */
    PyObject *regions;        /* dict: region -> dict */
    PyObject *clock;          /* None: CLOCK_MONOTONIC, the clock of time.monotonic */
    double fresh_until;
    double max_staleness;
    long long misses;
    ReadyObject *spare; /* the last awaitable handed out, reused once nobody holds it */
} ReaderObject;

static int
Reader_init(ReaderObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"default_bucket", "regions", "clock", "fresh_until",
                             "max_staleness", NULL};
    PyObject *bucket, *regions, *clock;
    double fresh_until, max_staleness;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!O!Odd", kwlist, &PyDict_Type, &bucket,
                                     &PyDict_Type, &regions, &clock, &fresh_until,
                                     &max_staleness))
        return -1;
    Py_INCREF(bucket);
    Py_XSETREF(self->default_bucket, bucket);
    Py_INCREF(regions);
    Py_XSETREF(self->regions, regions);
    Py_INCREF(clock);
    Py_XSETREF(self->clock, clock);
    self->fresh_until = fresh_until;
    self->max_staleness = max_staleness;
    self->misses = 0;
    return 0;
}

static int
Reader_traverse(ReaderObject *self, visitproc visit, void *arg)
{
    if (self->spare != NULL)
        Py_VISIT(self->spare->result);
    Py_VISIT(self->default_bucket);
    Py_VISIT(self->regions);
    Py_VISIT(self->clock);
    return 0;
}

static int
Reader_clear(ReaderObject *self)
{
    Py_CLEAR(self->spare);
    Py_CLEAR(self->default_bucket);
    Py_CLEAR(self->regions);
    Py_CLEAR(self->clock);
    return 0;
}

static void
Reader_dealloc(ReaderObject *self)
{
    PyObject_GC_UnTrack(self);
    Reader_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
reader_now(ReaderObject *self, double *now)
{
    if (self->clock == NULL || self->clock == Py_None) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        *now = (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
        return 0;
    }
    PyObject *t = PyObject_CallNoArgs(self->clock);
    if (t == NULL)
        return -1;
    *now = PyFloat_AsDouble(t);
    Py_DECREF(t);
    if (*now == -1.0 && PyErr_Occurred())
        return -1;
    return 0;
}

/* Parse (key, default=None, region=None) from a vectorcall; return -1 on error. */
static int
parse_get_args(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, PyObject **key,
               PyObject **deflt, PyObject **region)
{
    *deflt = Py_None;
    *region = Py_None;
    if (nargs > 3) {
        PyErr_Format(PyExc_TypeError, "get() takes from 1 to 3 positional arguments");
        return -1;
    }
    *key = nargs >= 1 ? args[0] : NULL;
    if (nargs >= 2)
        *deflt = args[1];
    if (nargs >= 3)
        *region = args[2];
    if (kwnames) {
        Py_ssize_t n = PyTuple_GET_SIZE(kwnames);
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *name = PyTuple_GET_ITEM(kwnames, i);
            PyObject *value = args[nargs + i];
            int index;
            if (PyUnicode_CompareWithASCIIString(name, "key") == 0)
                index = 0;
            else if (PyUnicode_CompareWithASCIIString(name, "default") == 0)
                index = 1;
            else if (PyUnicode_CompareWithASCIIString(name, "region") == 0)
                index = 2;
            else
                index = -1;
            if (index >= 0 && index < nargs) {
                PyErr_Format(PyExc_TypeError, "get() got multiple values for argument '%U'",
                             name);
                return -1;
            }
            if (index == 0)
                *key = value;
            else if (index == 1)
                *deflt = value;
            else if (index == 2)
                *region = value;
            else {
                PyErr_Format(PyExc_TypeError, "get() got an unexpected keyword argument '%U'",
                             name);
                return -1;
            }
        }
    }
    if (*key == NULL) {
        PyErr_SetString(PyExc_TypeError, "get() missing required argument 'key'");
        return -1;
    }
    return 0;
}

/* The hit path. Returns a new reference, or NULL with an exception set. */
static PyObject *
reader_lookup(ReaderObject *self, PyObject *key, PyObject *deflt, PyObject *region)
{
    /* Hashing a key or region may run Python code (a str subclass), which may let another
     * thread clear the cache and free the dicts: hold strong references throughout. */
    PyObject *bucket;
    if (region == Py_None) {
        bucket = self->default_bucket;
        Py_XINCREF(bucket);
    }
    else {
        PyObject *regions = self->regions;
        Py_INCREF(regions);
        bucket = PyDict_GetItemWithError(regions, region);
        Py_XINCREF(bucket);
        Py_DECREF(regions);
        if (bucket == NULL && PyErr_Occurred())
            return NULL;
    }
    if (bucket != NULL && PyDict_CheckExact(bucket)) {
        PyObject *found = PyDict_GetItemWithError(bucket, key); /* borrowed from bucket */
        if (found == NULL && PyErr_Occurred()) {
            Py_DECREF(bucket);
            return NULL;
        }
        if (found != NULL && Py_TYPE(found) == &EntryType) {
            EntryObject *entry = (EntryObject *)found;
            double now;
            Py_INCREF(entry); /* the clock may run Python code that drops it */
            Py_DECREF(bucket);
            bucket = NULL;
            if (reader_now(self, &now) < 0) {
                Py_DECREF(entry);
                return NULL;
            }
            if (now < entry->expires &&
                (now <= self->fresh_until || now <= entry->stored + self->max_staleness)) {
                entry->hits++;
                if (entry->sliding != 0.0) {
                    double next = now + entry->sliding;
                    entry->expires = next < entry->deadline ? next : entry->deadline;
                }
                PyObject *value = entry->value;
                Py_INCREF(value);
                Py_DECREF(entry);
                return value;
            }
            Py_DECREF(entry);
        }
    }
    Py_XDECREF(bucket);
    self->misses++;
    Py_INCREF(deflt);
    return deflt;
}

static PyObject *
Reader_get(ReaderObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *key, *deflt, *region;
    if (parse_get_args(args, nargs, kwnames, &key, &deflt, &region) < 0)
        return NULL;
    return reader_lookup(self, key, deflt, region);
}

static PyObject *
Reader_aget(ReaderObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *key, *deflt, *region;
    if (parse_get_args(args, nargs, kwnames, &key, &deflt, &region) < 0)
        return NULL;
    PyObject *value = reader_lookup(self, key, deflt, region);
    if (value == NULL)
        return NULL;
    ReadyObject *spare = self->spare;
    if (spare != NULL && Py_REFCNT(spare) == 1) {
        /* Nobody else holds the last one: the common `await cache.get(k)` pattern. Take our
         * reference before releasing the old result: its finalizer may read the cache, and
         * must then see this awaitable as taken. */
        PyObject *old = spare->result;
        spare->result = value;
        Py_INCREF(spare);
        Py_XDECREF(old);
        return (PyObject *)spare;
    }
    ReadyObject *ready = PyObject_New(ReadyObject, &ReadyType);
    if (ready == NULL) {
        Py_DECREF(value);
        return NULL;
    }
    ready->result = value; /* steals the reference */
    Py_INCREF(ready);
    Py_XSETREF(self->spare, ready);
    return (PyObject *)ready;
}

static PyMethodDef Reader_methods[] = {
    {"get", (PyCFunction)(void (*)(void))Reader_get, METH_FASTCALL | METH_KEYWORDS,
     "get(key, default=None, region=None): the value if servable, else default."},
    {"aget", (PyCFunction)(void (*)(void))Reader_aget, METH_FASTCALL | METH_KEYWORDS,
     "aget(key, default=None, region=None): get() as an awaitable that never suspends."},
    {NULL},
};

static PyMemberDef Reader_members[] = {
    {"default_bucket", T_OBJECT_EX, offsetof(ReaderObject, default_bucket), 0, NULL},
    {"regions", T_OBJECT_EX, offsetof(ReaderObject, regions), 0, NULL},
    {"fresh_until", T_DOUBLE, offsetof(ReaderObject, fresh_until), 0, NULL},
    {"max_staleness", T_DOUBLE, offsetof(ReaderObject, max_staleness), READONLY, NULL},
    {"misses", T_LONGLONG, offsetof(ReaderObject, misses), 0, NULL},
    {NULL},
};

static PyTypeObject ReaderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "nearcache._core._speedups.Reader",
    .tp_basicsize = sizeof(ReaderObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The L1 read path.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Reader_init,
    .tp_dealloc = (destructor)Reader_dealloc,
    .tp_traverse = (traverseproc)Reader_traverse,
    .tp_clear = (inquiry)Reader_clear,
    .tp_methods = Reader_methods,
    .tp_members = Reader_members,
};

/* ---------------------------------------------------------------- module */

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "nearcache._core._speedups",
    .m_doc = "The L1 hit path in C.",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    if (PyType_Ready(&EntryType) < 0 || PyType_Ready(&ReadyType) < 0 ||
        PyType_Ready(&ReaderType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&speedups_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&EntryType);
    Py_INCREF(&ReaderType);
    Py_INCREF(&ReadyType);
    if (PyModule_AddObject(m, "Entry", (PyObject *)&EntryType) < 0 ||
        PyModule_AddObject(m, "Reader", (PyObject *)&ReaderType) < 0 ||
        PyModule_AddObject(m, "Ready", (PyObject *)&ReadyType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
