/*
 * nearcache._core._speedups: the L1 store's hot paths in C (optional; store.py has the same
 * logic in Python, and tests/test_accelerator.py holds the two to the same results).
 *
 * Entry, AtomicEntry, SlidingEntry - one cached value with its timestamps (the fields
 *           store.py reads). Only the Table makes them.
 * Table   - the entries by region, the CLOCK ring and the counters, with
 *           get(key, default=None, region=None): a dictionary lookup, one clock read and the
 *             staleness rule, without entering the interpreter; aget(...) returns an
 *             awaitable that completes at once, so an asyncio hit never suspends;
 *           set(key, value, region=None, ttl=None, sliding=None, stored=None), insert(...) (a
 *             committed load), retime(...) (a touch), remove(key, region=None),
 *             clear_region(region) and clear().
 *
 * The rule is the one in store.py: an entry is served at `now` only while
 * now < expires and (now <= fresh_until or now <= stored + max_staleness).
 *
 * Writers are serialized by the caller; get() may run concurrently with one writer. Every
 * write below changes the entries and counters in a block that runs no Python code, and
 * drops its references (which may run a finalizer, and so anything) only once the state is
 * whole again. Hashing a key may run Python code too (a str subclass), so every object used
 * across a dictionary operation is held by a strong reference.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <limits.h>
#include <time.h>

#define API_VERSION 3 /* store.py refuses a build whose interface is not the one it expects */
#define LOOKAHEAD 8   /* how far the eviction hand looks for an expired entry first */

static PyObject *str_append, *str_popleft, *str_cancelled;
static PyObject *str_key, *str_default, *str_region, *str_value, *str_ttl, *str_sliding,
    *str_stored;
static PyObject *DequeType;

/* ---------------------------------------------------------------- entries */

/* Three layouts of one entry, told apart by type:
 *   Entry        - the fields below, tracked by the cycle collector;
 *   AtomicEntry  - the same, untracked and without the collector's header (16 bytes less):
 *                  used when the key, the region and the value are all objects the collector
 *                  cannot see through (strings, numbers, bytes, None, untracked tuples). A
 *                  cycle through such an entry would have to pass through one of them, which
 *                  the collector cannot follow either, so untracking loses nothing;
 *   SlidingEntry - the fields plus the sliding window and the hard deadline (tracked). */
typedef struct {
    PyObject_HEAD
    PyObject *key;
    PyObject *region;
    PyObject *value;
    double stored;  /* when the value was known current */
    double expires; /* next expiry */
    /* 32-bit counters keep the object in a smaller allocation class; they wrap after 4e9
     * hits, which only makes the CLOCK hand see one extra use and the hit count low. */
    unsigned int hits;
    unsigned int mark; /* hits seen by the eviction hand at its last pass */
} EntryObject;

typedef struct {
    EntryObject base;
    double deadline; /* hard limit: absolute TTL and max_age */
    double sliding;  /* the window in seconds; 0.0 once overwritten by a non-sliding set */
} SlidingEntryObject;

static PyTypeObject EntryType, AtomicEntryType, SlidingEntryType;

#define IS_ENTRY(o)                                                                           \
    (Py_TYPE(o) == &AtomicEntryType || Py_TYPE(o) == &EntryType ||                            \
     Py_TYPE(o) == &SlidingEntryType)

/* Whether the collector cannot see through `o`, now or ever (tuples never become tracked
 * again once untracked: they cannot change). */
static inline int
is_atomic(PyObject *o)
{
    return !PyObject_IS_GC(o) || (PyTuple_CheckExact(o) && !PyObject_GC_IsTracked(o));
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

static void
AtomicEntry_dealloc(EntryObject *self)
{
    Entry_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Entry_get_deadline(EntryObject *self, void *closure)
{
    if (Py_TYPE(self) == &SlidingEntryType)
        return PyFloat_FromDouble(((SlidingEntryObject *)self)->deadline);
    return PyFloat_FromDouble(self->expires);
}

static PyObject *
Entry_get_sliding(EntryObject *self, void *closure)
{
    if (Py_TYPE(self) == &SlidingEntryType)
        return PyFloat_FromDouble(((SlidingEntryObject *)self)->sliding);
    return PyFloat_FromDouble(0.0);
}

static PyMemberDef Entry_members[] = {
    {"key", T_OBJECT, offsetof(EntryObject, key), READONLY, NULL},
    {"region", T_OBJECT, offsetof(EntryObject, region), READONLY, NULL},
    {"value", T_OBJECT, offsetof(EntryObject, value), READONLY, NULL},
    {"stored", T_DOUBLE, offsetof(EntryObject, stored), READONLY, NULL},
    {"expires", T_DOUBLE, offsetof(EntryObject, expires), READONLY, NULL},
    {"hits", T_UINT, offsetof(EntryObject, hits), READONLY, NULL},
    {"mark", T_UINT, offsetof(EntryObject, mark), READONLY, NULL},
    {NULL},
};

static PyGetSetDef Entry_getset[] = {
    {"deadline", (getter)Entry_get_deadline, NULL, NULL, NULL},
    {"sliding", (getter)Entry_get_sliding, NULL, NULL, NULL},
    {NULL},
};

static PyTypeObject EntryType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "nearcache._core._speedups.Entry",
    .tp_basicsize = sizeof(EntryObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "One cached value with its timestamps (made by a Table).",
    .tp_dealloc = (destructor)Entry_dealloc,
    .tp_traverse = (traverseproc)Entry_traverse,
    .tp_clear = (inquiry)Entry_clear,
    .tp_members = Entry_members,
    .tp_getset = Entry_getset,
};

static PyTypeObject AtomicEntryType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "nearcache._core._speedups.AtomicEntry",
    .tp_basicsize = sizeof(EntryObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "An Entry whose key, region and value the cycle collector cannot see through.",
    .tp_dealloc = (destructor)AtomicEntry_dealloc,
    .tp_members = Entry_members,
    .tp_getset = Entry_getset,
};

static PyMemberDef SlidingEntry_members[] = {
    {"deadline", T_DOUBLE, offsetof(SlidingEntryObject, deadline), READONLY, NULL},
    {"sliding", T_DOUBLE, offsetof(SlidingEntryObject, sliding), READONLY, NULL},
    {NULL},
};

static PyTypeObject SlidingEntryType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "nearcache._core._speedups.SlidingEntry",
    .tp_basicsize = sizeof(SlidingEntryObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "An Entry with a sliding expiration.",
    .tp_dealloc = (destructor)Entry_dealloc,
    .tp_traverse = (traverseproc)Entry_traverse,
    .tp_clear = (inquiry)Entry_clear,
    .tp_members = SlidingEntry_members,
    .tp_base = &EntryType,
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

/* ---------------------------------------------------------------- Table */

typedef struct {
    PyObject_HEAD
    PyObject *default_bucket; /* dict: key -> entry, the region None */
    PyObject *regions;        /* dict: region -> dict (None -> default_bucket) */
    PyObject *reservations;   /* dict: (region, key) -> Reservation, shared with store.py */
    PyObject *ring;           /* collections.deque: the CLOCK ring, holds dead entries lazily */
    PyObject *clock;          /* None: CLOCK_MONOTONIC, the clock of time.monotonic */
    double fresh_until;
    double max_staleness;
    double ttl; /* the default; has_ttl says whether there is one */
    double sliding; /* the default; 0.0: none */
    double max_age;
    int has_ttl;
    Py_ssize_t max_entries;
    Py_ssize_t count;
    long long misses, sets, evictions, expirations, retired_hits;
    unsigned long long version; /* bumped by every write: tells a write that another ran */
    ReadyObject *spare; /* the last awaitable handed out, reused once nobody holds it */
} TableObject;

static int
Table_init(TableObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"clock", "max_entries", "ttl", "sliding", "max_age",
                             "max_staleness", NULL};
    PyObject *clock, *ttl, *sliding;
    Py_ssize_t max_entries;
    double max_age, max_staleness;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OnOOdd", kwlist, &clock, &max_entries, &ttl,
                                     &sliding, &max_age, &max_staleness))
        return -1;
    self->has_ttl = ttl != Py_None;
    self->ttl = self->has_ttl ? PyFloat_AsDouble(ttl) : 0.0;
    self->sliding = sliding != Py_None ? PyFloat_AsDouble(sliding) : 0.0;
    if (PyErr_Occurred())
        return -1;
    PyObject *bucket = PyDict_New();
    PyObject *regions = PyDict_New();
    PyObject *reservations = PyDict_New();
    PyObject *ring = PyObject_CallNoArgs(DequeType);
    if (bucket == NULL || regions == NULL || reservations == NULL || ring == NULL ||
        PyDict_SetItem(regions, Py_None, bucket) < 0) {
        Py_XDECREF(bucket);
        Py_XDECREF(regions);
        Py_XDECREF(reservations);
        Py_XDECREF(ring);
        return -1;
    }
    Py_XSETREF(self->default_bucket, bucket);
    Py_XSETREF(self->regions, regions);
    Py_XSETREF(self->reservations, reservations);
    Py_XSETREF(self->ring, ring);
    Py_INCREF(clock);
    Py_XSETREF(self->clock, clock);
    self->max_entries = max_entries;
    self->max_age = max_age;
    self->max_staleness = max_staleness;
    /* Local caches never go stale; a backplane cache starts unconfirmed. */
    self->fresh_until = Py_IS_INFINITY(max_staleness) && max_staleness > 0 ? max_staleness
                                                                         : -Py_HUGE_VAL;
    self->count = 0;
    self->misses = self->sets = self->evictions = self->expirations = self->retired_hits = 0;
    return 0;
}

static int
Table_traverse(TableObject *self, visitproc visit, void *arg)
{
    if (self->spare != NULL)
        Py_VISIT(self->spare->result);
    Py_VISIT(self->default_bucket);
    Py_VISIT(self->regions);
    Py_VISIT(self->reservations);
    Py_VISIT(self->ring);
    Py_VISIT(self->clock);
    return 0;
}

static int
Table_clear(TableObject *self)
{
    Py_CLEAR(self->spare);
    Py_CLEAR(self->default_bucket);
    Py_CLEAR(self->regions);
    Py_CLEAR(self->reservations);
    Py_CLEAR(self->ring);
    Py_CLEAR(self->clock);
    return 0;
}

static void
Table_dealloc(TableObject *self)
{
    PyObject_GC_UnTrack(self);
    Table_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
table_now(TableObject *self, double *now)
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

/* Parse a call's arguments into out[0..n) by the names in `names` (interned), like a Python
 * function with `required` leading required parameters; missing optional ones are None. */
static int
parse_args(const char *fname, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
           PyObject *const *names, Py_ssize_t n, Py_ssize_t required, PyObject **out)
{
    if (nargs > n) {
        PyErr_Format(PyExc_TypeError, "%s() takes from %zd to %zd positional arguments", fname,
                     required, n);
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        out[i] = i < nargs ? args[i] : NULL;
    if (kwnames) {
        Py_ssize_t nkw = PyTuple_GET_SIZE(kwnames);
        for (Py_ssize_t k = 0; k < nkw; k++) {
            PyObject *name = PyTuple_GET_ITEM(kwnames, k);
            Py_ssize_t index = -1;
            for (Py_ssize_t i = 0; i < n && index < 0; i++)
                if (name == names[i])
                    index = i;
            for (Py_ssize_t i = 0; i < n && index < 0; i++)
                if (PyUnicode_Compare(name, names[i]) == 0)
                    index = i;
            if (index < 0) {
                PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument '%U'",
                             fname, name);
                return -1;
            }
            if (out[index] != NULL) {
                PyErr_Format(PyExc_TypeError, "%s() got multiple values for argument '%U'",
                             fname, name);
                return -1;
            }
            out[index] = args[nargs + k];
        }
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (out[i] == NULL) {
            if (i < required) {
                PyErr_Format(PyExc_TypeError, "%s() missing required argument '%U'", fname,
                             names[i]);
                return -1;
            }
            out[i] = Py_None;
        }
    }
    return 0;
}

/* ---- the read path */

/* The hit path. Returns a new reference, or NULL with an exception set. */
static PyObject *
table_lookup(TableObject *self, PyObject *key, PyObject *deflt, PyObject *region)
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
        if (found != NULL && IS_ENTRY(found)) {
            EntryObject *entry = (EntryObject *)found;
            double now;
            Py_INCREF(entry); /* the clock may run Python code that drops it */
            Py_DECREF(bucket);
            bucket = NULL;
            if (table_now(self, &now) < 0) {
                Py_DECREF(entry);
                return NULL;
            }
            /* From here on no Python code runs: a writer's in-place update of this entry
             * happened wholly before or happens wholly after. */
            if (now < entry->expires &&
                (now <= self->fresh_until || now <= entry->stored + self->max_staleness)) {
                entry->hits++;
                if (Py_TYPE(entry) == &SlidingEntryType) {
                    SlidingEntryObject *s = (SlidingEntryObject *)entry;
                    if (s->sliding != 0.0) {
                        /* min(now + sliding, deadline), as Python's min orders it */
                        double next = now + s->sliding;
                        entry->expires = s->deadline < next ? s->deadline : next;
                    }
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
Table_get(TableObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *a[3];
    if (nargs == 1 && kwnames == NULL) /* the common call: get(key) */
        return table_lookup(self, args[0], Py_None, Py_None);
    PyObject *names[3] = {str_key, str_default, str_region};
    if (parse_args("get", args, nargs, kwnames, names, 3, 1, a) < 0)
        return NULL;
    return table_lookup(self, a[0], a[1], a[2]);
}

static PyObject *
Table_aget(TableObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *a[3] = {NULL, Py_None, Py_None};
    PyObject *names[3] = {str_key, str_default, str_region};
    if (nargs == 1 && kwnames == NULL) /* the common call: aget(key) */
        a[0] = args[0];
    else if (parse_args("aget", args, nargs, kwnames, names, 3, 1, a) < 0)
        return NULL;
    PyObject *value = table_lookup(self, a[0], a[1], a[2]);
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

/* ---- the write path */

/* The bucket an entry lives in (a new reference), NULL with no error when its region is gone. */
static PyObject *
bucket_of(TableObject *self, PyObject *region)
{
    PyObject *bucket;
    if (region == Py_None)
        bucket = self->default_bucket;
    else {
        PyObject *regions = self->regions;
        Py_INCREF(regions);
        bucket = PyDict_GetItemWithError(regions, region);
        Py_DECREF(regions);
    }
    Py_XINCREF(bucket);
    return bucket;
}

/* The bucket of `region` (a new reference), made if there is none; NULL on error. */
static PyObject *
bucket_for(TableObject *self, PyObject *region)
{
    PyObject *bucket = bucket_of(self, region);
    if (bucket != NULL || PyErr_Occurred())
        return bucket;
    bucket = PyDict_New();
    if (bucket == NULL)
        return NULL;
    PyObject *regions = self->regions;
    Py_INCREF(regions);
    int rc = PyDict_SetItem(regions, region, bucket);
    Py_DECREF(regions);
    if (rc < 0) {
        Py_DECREF(bucket);
        return NULL;
    }
    return bucket;
}

/* Whether `entry` is still the one held for its key: 1, 0, or -1 on error. */
static int
entry_live(TableObject *self, EntryObject *entry)
{
    PyObject *bucket = bucket_of(self, entry->region);
    if (bucket == NULL)
        return PyErr_Occurred() ? -1 : 0;
    PyObject *found = PyDict_GetItemWithError(bucket, entry->key);
    Py_DECREF(bucket);
    if (found == NULL)
        return PyErr_Occurred() ? -1 : 0;
    return found == (PyObject *)entry;
}

/* Drop a live entry from its bucket (the caller holds a reference to it). */
static int
entry_drop(TableObject *self, EntryObject *entry)
{
    PyObject *bucket = bucket_of(self, entry->region);
    if (bucket == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetObject(PyExc_KeyError, entry->region);
        return -1;
    }
    if (PyDict_DelItem(bucket, entry->key) < 0) {
        Py_DECREF(bucket);
        return -1;
    }
    if (PyDict_GET_SIZE(bucket) == 0 && entry->region != Py_None) {
        PyObject *regions = self->regions;
        Py_INCREF(regions);
        int rc = PyDict_DelItem(regions, entry->region);
        Py_DECREF(regions);
        if (rc < 0) {
            Py_DECREF(bucket);
            return -1;
        }
    }
    Py_DECREF(bucket);
    self->count--;
    self->retired_hits += entry->hits;
    return 0;
}

static PyObject *
ring_popleft(PyObject *ring)
{
    return PyObject_CallMethodNoArgs(ring, str_popleft);
}

static int
ring_append(PyObject *ring, PyObject *entry)
{
    PyObject *r = PyObject_CallMethodOneArg(ring, str_append, entry);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* Whether ring[i] is still `item`: checking liveness may run Python code (a key's hash),
 * which may have moved the ring under us. 1, 0, or -1 on error. */
static int
ring_holds_at(PyObject *ring, Py_ssize_t i, PyObject *item)
{
    if (i >= PyObject_Size(ring))
        return PyErr_Occurred() ? -1 : 0;
    PyObject *there = PySequence_GetItem(ring, i);
    if (there == NULL)
        return -1;
    Py_DECREF(there);
    return there == item;
}

/* Make room for one entry: an expired one near the hand first, else CLOCK. */
static int
evict_one(TableObject *self, double now)
{
    PyObject *ring = self->ring;
    Py_INCREF(ring);
    Py_ssize_t n = PyObject_Size(ring);
    if (n > LOOKAHEAD)
        n = LOOKAHEAD;
    /* An expired entry near the hand goes before any live one (a short look-ahead keeps this
     * O(1); the sweep frees the rest of the expired entries over time). */
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PySequence_GetItem(ring, i);
        if (item == NULL)
            goto error;
        EntryObject *entry = (EntryObject *)item;
        int live = now >= entry->expires ? entry_live(self, entry) : 0;
        if (live > 0)
            live = ring_holds_at(ring, i, item);
        if (live > 0) {
            if (PySequence_DelItem(ring, i) < 0 || entry_drop(self, entry) < 0) {
                Py_DECREF(item);
                goto error;
            }
            self->expirations++;
            Py_DECREF(ring);
            Py_DECREF(item);
            return 0;
        }
        Py_DECREF(item);
        if (live < 0)
            goto error;
    }
    while (PyObject_Size(ring) > 0) {
        PyObject *item = ring_popleft(ring);
        if (item == NULL)
            goto error;
        EntryObject *entry = (EntryObject *)item;
        int live = entry_live(self, entry);
        if (live <= 0) {
            Py_DECREF(item);
            if (live < 0)
                goto error;
            continue;
        }
        if (entry->hits != entry->mark && now < entry->expires) {
            entry->mark = entry->hits; /* second chance: used since the hand last passed */
            int rc = ring_append(ring, item);
            Py_DECREF(item);
            if (rc < 0)
                goto error;
            continue;
        }
        if (entry_drop(self, entry) < 0) {
            Py_DECREF(item);
            goto error;
        }
        if (now < entry->expires)
            self->evictions++;
        else
            self->expirations++;
        Py_DECREF(ring);
        Py_DECREF(item);
        return 0;
    }
    Py_DECREF(ring);
    return 0;
error:
    Py_DECREF(ring);
    return -1;
}

/* Drop dead and expired entries at the hand (the oldest), so that expired entries do not pile
 * up with no size pressure. It stops at the first live one: moving entries past the hand
 * without a pass of the eviction policy would skew it. */
static int
sweep(TableObject *self, double now, int budget)
{
    PyObject *ring = self->ring;
    Py_INCREF(ring);
    for (int i = 0; i < budget && PyObject_Size(ring) > 0; i++) {
        PyObject *item = PySequence_GetItem(ring, 0);
        if (item == NULL)
            goto error;
        EntryObject *entry = (EntryObject *)item;
        int live = entry_live(self, entry);
        int held = live < 0 ? -1 : ring_holds_at(ring, 0, item);
        if (live < 0 || held <= 0 || (live > 0 && now < entry->expires)) {
            Py_DECREF(item);
            if (live < 0 || held < 0)
                goto error;
            break;
        }
        PyObject *head = ring_popleft(ring);
        if (head == NULL) {
            Py_DECREF(item);
            goto error;
        }
        int rc = 0;
        if (live > 0) {
            rc = entry_drop(self, entry);
            if (rc == 0)
                self->expirations++;
        }
        Py_DECREF(head);
        Py_DECREF(item);
        if (rc < 0)
            goto error;
    }
    Py_DECREF(ring);
    return 0;
error:
    Py_DECREF(ring);
    return -1;
}

/* Rebuild the ring from its live entries (dead ones pile up from removes and replaced
 * entries). Built aside and swapped in: checking liveness may run Python code. */
static int
compact(TableObject *self)
{
    PyObject *all = PySequence_List(self->ring);
    if (all == NULL)
        return -1;
    Py_ssize_t n = PyList_GET_SIZE(all), kept = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyList_GET_ITEM(all, i);
        int live = entry_live(self, (EntryObject *)item);
        if (live < 0) {
            Py_DECREF(all);
            return -1;
        }
        if (live) {
            Py_INCREF(item);
            PyObject *old = PyList_GET_ITEM(all, kept);
            PyList_SET_ITEM(all, kept, item);
            Py_DECREF(old);
            kept++;
        }
    }
    if (PyList_SetSlice(all, kept, n, NULL) < 0) {
        Py_DECREF(all);
        return -1;
    }
    PyObject *ring = PyObject_CallOneArg(DequeType, all);
    Py_DECREF(all);
    if (ring == NULL)
        return -1;
    Py_SETREF(self->ring, ring);
    return 0;
}

static EntryObject *
entry_new(PyObject *key, PyObject *region, PyObject *value, double sliding)
{
    EntryObject *entry;
    if (sliding != 0.0)
        entry = (EntryObject *)PyObject_GC_New(SlidingEntryObject, &SlidingEntryType);
    else if (is_atomic(key) && is_atomic(region) && is_atomic(value))
        entry = PyObject_New(EntryObject, &AtomicEntryType);
    else
        entry = PyObject_GC_New(EntryObject, &EntryType);
    if (entry == NULL)
        return NULL;
    Py_INCREF(key);
    entry->key = key;
    Py_INCREF(region);
    entry->region = region;
    Py_INCREF(value);
    entry->value = value;
    entry->hits = 0;
    entry->mark = 0;
    if (Py_TYPE(entry) != &AtomicEntryType)
        PyObject_GC_Track(entry); /* its fields are set: the collector may look now */
    return entry;
}

static int
as_double(PyObject *o, double *out)
{
    *out = PyFloat_AsDouble(o);
    return *out == -1.0 && PyErr_Occurred() ? -1 : 0;
}

/* Store an entry known current as of `stored` (None: now). */
static int
table_insert(TableObject *self, PyObject *key, PyObject *value, PyObject *region,
             PyObject *stored_obj, PyObject *ttl_obj, PyObject *sliding_obj)
{
    double now, stored, ttl = self->ttl, sliding = self->sliding;
    int has_ttl = self->has_ttl;
    if (table_now(self, &now) < 0)
        return -1;
    if (stored_obj == Py_None)
        stored = now;
    else if (as_double(stored_obj, &stored) < 0)
        return -1;
    if (ttl_obj != Py_None) {
        has_ttl = 1;
        if (as_double(ttl_obj, &ttl) < 0)
            return -1;
    }
    if (sliding_obj != Py_None && as_double(sliding_obj, &sliding) < 0)
        return -1;
    /* min() as Python's min orders its arguments, so a NaN behaves as in store.py */
    double limit = has_ttl && !(self->max_age < ttl) ? ttl : self->max_age;
    double deadline = now + limit;
    double expires = deadline;
    if (sliding != 0.0 && now + sliding < deadline)
        expires = now + sliding;

    /* Finalizers run by what this write frees (or by the collector, when it allocates) may
     * write to this table too: `version` tells when they did, and the decision is made
     * again. */
    self->version++;
    EntryObject *entry = NULL; /* made at most once */
    PyObject *bucket = NULL, *old = NULL;
retry:
    Py_CLEAR(bucket);
    Py_CLEAR(old);
    bucket = bucket_for(self, region);
    if (bucket == NULL)
        goto error;
    old = PyDict_GetItemWithError(bucket, key);
    if (old == NULL && PyErr_Occurred())
        goto error;
    Py_XINCREF(old);
    if (old != NULL && IS_ENTRY(old)) {
        PyTypeObject *type = Py_TYPE(old);
        if (type == &SlidingEntryType ||
            (sliding == 0.0 && (type == &EntryType || is_atomic(value)))) {
            /* Overwrite in place: no allocation, and the ring keeps its one reference. The
             * write counts as a use: the hand gives the entry one more pass. */
            EntryObject *held = (EntryObject *)old;
            PyObject *previous = held->value;
            Py_INCREF(value);
            held->value = value;
            held->stored = stored;
            held->expires = expires;
            if (type == &SlidingEntryType) {
                ((SlidingEntryObject *)held)->deadline = deadline;
                ((SlidingEntryObject *)held)->sliding = sliding;
            }
            self->retired_hits += held->hits;
            held->hits = 0;
            held->mark = UINT_MAX;
            self->sets++;
            Py_DECREF(bucket);
            Py_DECREF(old);
            Py_XDECREF(entry);
            Py_DECREF(previous); /* last: it may run a finalizer */
            return 0;
        }
    }
    if (entry == NULL) {
        unsigned long long version = self->version;
        entry = entry_new(key, region, value, sliding);
        if (entry == NULL)
            goto error;
        entry->stored = stored;
        entry->expires = expires;
        if (sliding != 0.0) {
            ((SlidingEntryObject *)entry)->deadline = deadline;
            ((SlidingEntryObject *)entry)->sliding = sliding;
        }
        if (version != self->version)
            goto retry;
    }
    if (old == NULL) {
        unsigned long long version = self->version;
        Py_CLEAR(bucket);
        if (sweep(self, now, 2) < 0)
            goto error;
        /* Make room before inserting, so the new entry is never its own victim. */
        while (self->count >= self->max_entries && PyObject_Size(self->ring) > 0)
            if (evict_one(self, now) < 0)
                goto error;
        bucket = bucket_for(self, region); /* evictions may have dropped an emptied region */
        if (bucket == NULL)
            goto error;
        if (version != self->version) {
            old = PyDict_GetItemWithError(bucket, key); /* a finalizer may have set it */
            if (old == NULL && PyErr_Occurred())
                goto error;
            Py_XINCREF(old);
        }
        if (old == NULL)
            self->count++;
    }
    if (old != NULL && IS_ENTRY(old))
        self->retired_hits += ((EntryObject *)old)->hits;
    /* the old entry, if any, stays alive in the ring until the hand or a compaction drops it */
    if (PyDict_SetItem(bucket, key, (PyObject *)entry) < 0)
        goto error;
    self->sets++;
    if (ring_append(self->ring, (PyObject *)entry) < 0)
        goto error;
    Py_DECREF(bucket);
    Py_DECREF(entry);
    Py_XDECREF(old); /* last: it may be freed, and run a finalizer */
    if (PyObject_Size(self->ring) > 2 * self->count + 1024)
        return compact(self);
    return 0;
error:
    Py_XDECREF(bucket);
    Py_XDECREF(entry);
    Py_XDECREF(old);
    return -1;
}

/* Cancel the load of (region, key) in flight, if any. */
static int
cancel_reservation(TableObject *self, PyObject *key, PyObject *region)
{
    PyObject *ident = PyTuple_Pack(2, region, key);
    if (ident == NULL)
        return -1;
    PyObject *reservations = self->reservations;
    Py_INCREF(reservations);
    PyObject *reservation = PyDict_GetItemWithError(reservations, ident);
    int rc = 0;
    if (reservation != NULL) {
        Py_INCREF(reservation);
        rc = PyDict_DelItem(reservations, ident);
        if (rc == 0)
            rc = PyObject_SetAttr(reservation, str_cancelled, Py_True);
        Py_DECREF(reservation);
    }
    else if (PyErr_Occurred())
        rc = -1;
    Py_DECREF(reservations);
    Py_DECREF(ident);
    return rc;
}

static PyObject *
Table_set(TableObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *a[6];
    PyObject *names[6] = {str_key, str_value, str_region, str_ttl, str_sliding, str_stored};
    if (parse_args("set", args, nargs, kwnames, names, 6, 2, a) < 0)
        return NULL;
    if (PyDict_GET_SIZE(self->reservations) && cancel_reservation(self, a[0], a[2]) < 0)
        return NULL;
    if (table_insert(self, a[0], a[1], a[2], a[5], a[3], a[4]) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
Table_insert(TableObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError,
                        "insert() takes (key, value, region, stored, ttl, sliding)");
        return NULL;
    }
    if (table_insert(self, args[0], args[1], args[2], args[3], args[4], args[5]) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
Table_remove(TableObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *a[2];
    PyObject *names[2] = {str_key, str_region};
    if (parse_args("remove", args, nargs, kwnames, names, 2, 1, a) < 0)
        return NULL;
    PyObject *key = a[0], *region = a[1];
    self->version++;
    if (PyDict_GET_SIZE(self->reservations) && cancel_reservation(self, key, region) < 0)
        return NULL;
    PyObject *bucket = bucket_of(self, region);
    if (bucket == NULL) {
        if (PyErr_Occurred())
            return NULL;
        Py_RETURN_FALSE;
    }
    PyObject *found = PyDict_GetItemWithError(bucket, key);
    Py_XINCREF(found);
    Py_DECREF(bucket);
    if (found == NULL) {
        if (PyErr_Occurred())
            return NULL;
        Py_RETURN_FALSE;
    }
    int rc = IS_ENTRY(found) ? entry_drop(self, (EntryObject *)found) : 0;
    Py_DECREF(found);
    if (rc < 0)
        return NULL;
    Py_RETURN_TRUE;
}

/* retime(key, region, expires, deadline): new expiry times for a held entry (a touch), in
 * place: no Python code runs between the two writes. */
static PyObject *
Table_retime(TableObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    double expires, deadline;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "retime() takes (key, region, expires, deadline)");
        return NULL;
    }
    if (as_double(args[2], &expires) < 0 || as_double(args[3], &deadline) < 0)
        return NULL;
    PyObject *bucket = bucket_of(self, args[1]);
    if (bucket == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetObject(PyExc_KeyError, args[0]);
        return NULL;
    }
    PyObject *found = PyDict_GetItemWithError(bucket, args[0]);
    Py_XINCREF(found);
    Py_DECREF(bucket);
    if (found == NULL || !IS_ENTRY(found)) {
        if (!PyErr_Occurred())
            PyErr_SetObject(PyExc_KeyError, args[0]);
        Py_XDECREF(found);
        return NULL;
    }
    ((EntryObject *)found)->expires = expires;
    if (Py_TYPE(found) == &SlidingEntryType)
        ((SlidingEntryObject *)found)->deadline = deadline;
    Py_DECREF(found);
    Py_RETURN_NONE;
}

static int
sum_hits(PyObject *bucket, long long *total)
{
    Py_ssize_t pos = 0;
    PyObject *k, *v;
    while (PyDict_Next(bucket, &pos, &k, &v))
        if (IS_ENTRY(v))
            *total += ((EntryObject *)v)->hits;
    return 0;
}

static PyObject *
Table_clear_region(TableObject *self, PyObject *region)
{
    self->version++;
    PyObject *regions = self->regions;
    Py_INCREF(regions);
    PyObject *bucket = PyDict_GetItemWithError(regions, region);
    Py_XINCREF(bucket);
    if (bucket != NULL && PyDict_DelItem(regions, region) < 0) {
        Py_DECREF(regions);
        Py_DECREF(bucket);
        return NULL;
    }
    Py_DECREF(regions);
    if (bucket == NULL && PyErr_Occurred())
        return NULL;
    if (region == Py_None) {
        PyObject *fresh = PyDict_New();
        if (fresh == NULL || PyDict_SetItem(self->regions, Py_None, fresh) < 0) {
            Py_XDECREF(fresh);
            Py_XDECREF(bucket);
            return NULL;
        }
        Py_SETREF(self->default_bucket, fresh);
    }
    if (bucket == NULL)
        return PyLong_FromLong(0);
    Py_ssize_t held = PyDict_GET_SIZE(bucket);
    long long hits = 0;
    sum_hits(bucket, &hits);
    self->count -= held;
    self->retired_hits += hits;
    Py_DECREF(bucket); /* last: freeing the entries may run finalizers */
    return PyLong_FromSsize_t(held);
}

static PyObject *
Table_clear_all(TableObject *self, PyObject *unused)
{
    self->version++;
    PyObject *bucket = PyDict_New();
    PyObject *regions = PyDict_New();
    PyObject *ring = PyObject_CallNoArgs(DequeType);
    if (bucket == NULL || regions == NULL || ring == NULL ||
        PyDict_SetItem(regions, Py_None, bucket) < 0) {
        Py_XDECREF(bucket);
        Py_XDECREF(regions);
        Py_XDECREF(ring);
        return NULL;
    }
    Py_ssize_t held = self->count;
    long long hits = 0;
    Py_ssize_t pos = 0;
    PyObject *k, *b;
    while (PyDict_Next(self->regions, &pos, &k, &b))
        if (PyDict_CheckExact(b))
            sum_hits(b, &hits);
    self->retired_hits += hits;
    self->count = 0;
    PyObject *old_bucket = self->default_bucket, *old_regions = self->regions,
             *old_ring = self->ring;
    self->default_bucket = bucket;
    self->regions = regions;
    self->ring = ring;
    /* last: freeing the entries may run finalizers, which now see an empty table */
    Py_XDECREF(old_bucket);
    Py_XDECREF(old_regions);
    Py_XDECREF(old_ring);
    return PyLong_FromSsize_t(held);
}

static PyMethodDef Table_methods[] = {
    {"get", (PyCFunction)(void (*)(void))Table_get, METH_FASTCALL | METH_KEYWORDS,
     "get(key, default=None, region=None): the value if servable, else default."},
    {"aget", (PyCFunction)(void (*)(void))Table_aget, METH_FASTCALL | METH_KEYWORDS,
     "aget(key, default=None, region=None): get() as an awaitable that never suspends."},
    {"set", (PyCFunction)(void (*)(void))Table_set, METH_FASTCALL | METH_KEYWORDS,
     "set(key, value, region=None, ttl=None, sliding=None, stored=None): store a value\n"
     "known current as of stored (None: now), cancelling a load of the key in flight."},
    {"insert", (PyCFunction)(void (*)(void))Table_insert, METH_FASTCALL,
     "insert(key, value, region, stored, ttl, sliding): store a value current as of stored."},
    {"retime", (PyCFunction)(void (*)(void))Table_retime, METH_FASTCALL,
     "retime(key, region, expires, deadline): new expiry times for a held entry."},
    {"remove", (PyCFunction)(void (*)(void))Table_remove, METH_FASTCALL | METH_KEYWORDS,
     "remove(key, region=None): drop one key; return whether an entry was held."},
    {"clear_region", (PyCFunction)Table_clear_region, METH_O,
     "clear_region(region): drop a region's entries; return how many were held."},
    {"clear", (PyCFunction)Table_clear_all, METH_NOARGS,
     "clear(): drop every entry; return how many were held."},
    {NULL},
};

static PyMemberDef Table_members[] = {
    {"default_bucket", T_OBJECT_EX, offsetof(TableObject, default_bucket), READONLY, NULL},
    {"regions", T_OBJECT_EX, offsetof(TableObject, regions), READONLY, NULL},
    {"reservations", T_OBJECT_EX, offsetof(TableObject, reservations), READONLY, NULL},
    {"ring", T_OBJECT_EX, offsetof(TableObject, ring), READONLY, NULL},
    {"fresh_until", T_DOUBLE, offsetof(TableObject, fresh_until), 0, NULL},
    {"max_staleness", T_DOUBLE, offsetof(TableObject, max_staleness), READONLY, NULL},
    {"max_entries", T_PYSSIZET, offsetof(TableObject, max_entries), READONLY, NULL},
    {"count", T_PYSSIZET, offsetof(TableObject, count), READONLY, NULL},
    {"misses", T_LONGLONG, offsetof(TableObject, misses), READONLY, NULL},
    {"sets", T_LONGLONG, offsetof(TableObject, sets), READONLY, NULL},
    {"evictions", T_LONGLONG, offsetof(TableObject, evictions), READONLY, NULL},
    {"expirations", T_LONGLONG, offsetof(TableObject, expirations), READONLY, NULL},
    {"retired_hits", T_LONGLONG, offsetof(TableObject, retired_hits), READONLY, NULL},
    {NULL},
};

static PyTypeObject TableType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "nearcache._core._speedups.Table",
    .tp_basicsize = sizeof(TableObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The L1 store's entries, CLOCK ring and counters, with its hot paths.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Table_init,
    .tp_dealloc = (destructor)Table_dealloc,
    .tp_traverse = (traverseproc)Table_traverse,
    .tp_clear = (inquiry)Table_clear,
    .tp_methods = Table_methods,
    .tp_members = Table_members,
};

/* ---------------------------------------------------------------- module */

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "nearcache._core._speedups",
    .m_doc = "The L1 store's hot paths in C.",
    .m_size = -1,
};

static int
intern(PyObject **slot, const char *text)
{
    *slot = PyUnicode_InternFromString(text);
    return *slot == NULL ? -1 : 0;
}

PyMODINIT_FUNC
PyInit__speedups(void)
{
    if (intern(&str_append, "append") < 0 || intern(&str_popleft, "popleft") < 0 ||
        intern(&str_cancelled, "cancelled") < 0 || intern(&str_key, "key") < 0 ||
        intern(&str_default, "default") < 0 || intern(&str_region, "region") < 0 ||
        intern(&str_value, "value") < 0 || intern(&str_ttl, "ttl") < 0 ||
        intern(&str_sliding, "sliding") < 0 || intern(&str_stored, "stored") < 0)
        return NULL;
    PyObject *collections = PyImport_ImportModule("collections");
    if (collections == NULL)
        return NULL;
    DequeType = PyObject_GetAttrString(collections, "deque");
    Py_DECREF(collections);
    if (DequeType == NULL)
        return NULL;
    if (PyType_Ready(&EntryType) < 0 || PyType_Ready(&AtomicEntryType) < 0 ||
        PyType_Ready(&SlidingEntryType) < 0 || PyType_Ready(&ReadyType) < 0 ||
        PyType_Ready(&TableType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&speedups_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "API", API_VERSION) < 0 ||
        PyModule_AddType(m, &EntryType) < 0 || PyModule_AddType(m, &AtomicEntryType) < 0 ||
        PyModule_AddType(m, &SlidingEntryType) < 0 || PyModule_AddType(m, &ReadyType) < 0 ||
        PyModule_AddType(m, &TableType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
