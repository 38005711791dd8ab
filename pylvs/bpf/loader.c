/*
 * pylvs._bpf: a narrow libbpf binding for the director's BPF programs.
 *
 * Object: open and load a compiled BPF object file (maps sized first);
 * Object.attach_tcx_ingress(): a BPF link attaching one of its programs at
 * tc ingress (tcx) of an interface. The link is never pinned: its file
 * descriptor (close-on-exec, as every BPF fd) is the only reference, so
 * when the process dies the kernel detaches the program.
 * Object.attach_tun_steering(): a TAP's queue-steering program
 * (TUNSETSTEERINGEBPF), which the device holds, not a link.
 * Object.prog_fd(): a program's descriptor for attachments made by socket
 * option (the AF_PACKET fanout program, PACKET_FANOUT_DATA).
 * Map: update, delete and list keys in bulk, sum a per-CPU counter.
 * tcx_query / prog_info / map_from_id: what is attached where, for tests
 * and for looking at a running director from outside; prog_test_run: a
 * program's verdict on one frame, for the table-driven tests.
 *
 * Constants newer than the build host's linux/bpf.h (tcx came in 6.6) are
 * defined here with their UAPI values.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <linux/bpf.h>
#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <linux/if_link.h>
#include <linux/if_tun.h>

#define TCX_INGRESS 46      /* enum bpf_attach_type BPF_TCX_INGRESS */
#define TCX_EGRESS 47       /* BPF_TCX_EGRESS */
#define ATTACH_BEFORE (1U << 3)  /* BPF_F_BEFORE: first in the tcx chain */
#define MAX_QUERY 64

/* libbpf's messages, kept so that an error can say what libbpf said (the
 * verifier's complaint, a missing map) instead of only an errno. */
static char last_log[2048];

static int keep_log(enum libbpf_print_level level, const char *fmt, va_list ap)
{
	char line[512];
	size_t used = strlen(last_log);

	if (level == LIBBPF_DEBUG)
		return 0;
	vsnprintf(line, sizeof(line), fmt, ap);
	if (used + strlen(line) + 1 > sizeof(last_log))
		used = 0;  /* keep the latest messages */
	snprintf(last_log + used, sizeof(last_log) - used, "%s", line);
	return 0;
}

static PyObject *os_error(int err, const char *what)
{
	char msg[2600];

	if (err < 0)
		err = -err;
	snprintf(msg, sizeof(msg), "%s: %s%s%s", what, strerror(err),
		 last_log[0] ? "\n" : "", last_log);
	last_log[0] = '\0';
	PyObject *args = Py_BuildValue("(is)", err, msg);
	if (args) {
		PyErr_SetObject(PyExc_OSError, args);
		Py_DECREF(args);
	}
	return NULL;
}

static int sys_bpf(int cmd, void *attr, unsigned int size)
{
	return (int)syscall(__NR_bpf, cmd, attr, size);
}

/* ---- Map ------------------------------------------------------------------ */

typedef struct {
	PyObject_HEAD
	int fd;
	struct bpf_map_info info;
} MapObject;

static PyTypeObject MapType;

static PyObject *map_new_from_fd(int fd)
{
	MapObject *m;
	__u32 len = sizeof(m->info);

	m = PyObject_New(MapObject, &MapType);
	if (!m) {
		close(fd);
		return NULL;
	}
	m->fd = fd;
	memset(&m->info, 0, sizeof(m->info));
	if (bpf_obj_get_info_by_fd(fd, &m->info, &len)) {
		int err = errno;
		Py_DECREF(m);
		return os_error(err, "reading a BPF map's info");
	}
	return (PyObject *)m;
}

static void map_dealloc(MapObject *m)
{
	if (m->fd >= 0)
		close(m->fd);
	Py_TYPE(m)->tp_free((PyObject *)m);
}

static int map_open(MapObject *m)
{
	if (m->fd < 0) {
		PyErr_SetString(PyExc_ValueError, "BPF map is closed");
		return 0;
	}
	return 1;
}

static int check_keys(MapObject *m, Py_buffer *keys)
{
	if (keys->len % m->info.key_size) {
		PyErr_Format(PyExc_ValueError, "map %s: %zd bytes of keys is not a multiple of "
			     "the key size %u", m->info.name, keys->len, m->info.key_size);
		return 0;
	}
	return 1;
}

PyDoc_STRVAR(map_update_doc,
"update(keys: bytes, value: bytes) -> None\n\n"
"Set every key of ``keys`` (key_size bytes each, back to back) to ``value``\n"
"(value_size bytes). OSError (ENOSPC: the map is full, E2BIG) names the key.");

static PyObject *map_update(MapObject *m, PyObject *args)
{
	Py_buffer keys, value;
	Py_ssize_t i;
	int err = 0;

	if (!map_open(m) || !PyArg_ParseTuple(args, "y*y*", &keys, &value))
		return NULL;
	if (!check_keys(m, &keys))
		goto out;
	if ((size_t)value.len != m->info.value_size) {
		PyErr_Format(PyExc_ValueError, "map %s: value is %zd bytes, not %u",
			     m->info.name, value.len, m->info.value_size);
		goto out;
	}
	Py_BEGIN_ALLOW_THREADS
	for (i = 0; i < keys.len; i += m->info.key_size)
		if (bpf_map_update_elem(m->fd, (char *)keys.buf + i, value.buf, BPF_ANY)) {
			err = errno;
			break;
		}
	Py_END_ALLOW_THREADS
	if (err) {
		char what[128];
		snprintf(what, sizeof(what), "updating key %zd of BPF map %s",
			 i / m->info.key_size, m->info.name);
		os_error(err, what);
	}
out:
	PyBuffer_Release(&keys);
	PyBuffer_Release(&value);
	if (PyErr_Occurred())
		return NULL;
	Py_RETURN_NONE;
}

PyDoc_STRVAR(map_delete_doc,
"delete(keys: bytes) -> int\n\n"
"Delete every key of ``keys`` (key_size bytes each); a key that is not\n"
"there is skipped. Returns how many were deleted.");

static PyObject *map_delete(MapObject *m, PyObject *args)
{
	Py_buffer keys;
	Py_ssize_t i;
	long n = 0;
	int err = 0;

	if (!map_open(m) || !PyArg_ParseTuple(args, "y*", &keys))
		return NULL;
	if (!check_keys(m, &keys)) {
		PyBuffer_Release(&keys);
		return NULL;
	}
	Py_BEGIN_ALLOW_THREADS
	for (i = 0; i < keys.len; i += m->info.key_size) {
		if (bpf_map_delete_elem(m->fd, (char *)keys.buf + i) == 0)
			n++;
		else if (errno != ENOENT) {
			err = errno;
			break;
		}
	}
	Py_END_ALLOW_THREADS
	PyBuffer_Release(&keys);
	if (err)
		return os_error(err, "deleting from a BPF map");
	return PyLong_FromLong(n);
}

PyDoc_STRVAR(map_keys_doc,
"keys() -> bytes\n\n"
"Every key of a hash map, key_size bytes each, in the map's order.");

static PyObject *map_keys(MapObject *m, PyObject *unused)
{
	char key[256];
	char *buf = NULL;
	size_t n = 0, cap = 0, ks = m->info.key_size;
	PyObject *out;

	if (!map_open(m))
		return NULL;
	if (ks > sizeof(key)) {
		PyErr_SetString(PyExc_ValueError, "BPF map key too large to list");
		return NULL;
	}
	for (;;) {
		if (n == cap) {
			char *more = realloc(buf, (cap = cap ? 2 * cap : 64) * ks);
			if (!more) {
				free(buf);
				return PyErr_NoMemory();
			}
			buf = more;
		}
		if (bpf_map_get_next_key(m->fd, n ? key : NULL, buf + n * ks)) {
			int err = errno;
			if (err == ENOENT)
				break;
			free(buf);
			return os_error(err, "listing a BPF map");
		}
		memcpy(key, buf + n * ks, ks);
		n++;
	}
	out = PyBytes_FromStringAndSize(buf, n * ks);
	free(buf);
	return out;
}

PyDoc_STRVAR(map_sum_doc,
"sum_u64(index: int) -> int\n\n"
"The u64 at ``index`` of an array map, summed over CPUs for a per-CPU array.");

static PyObject *map_sum(MapObject *m, PyObject *args)
{
	unsigned int index;
	int ncpu = 1;
	unsigned long long total = 0;
	__u64 *values;

	if (!map_open(m) || !PyArg_ParseTuple(args, "I", &index))
		return NULL;
	if (m->info.value_size != 8) {
		PyErr_Format(PyExc_ValueError, "map %s: values are not u64", m->info.name);
		return NULL;
	}
	if (m->info.type == BPF_MAP_TYPE_PERCPU_ARRAY) {
		ncpu = libbpf_num_possible_cpus();
		if (ncpu < 1)
			return os_error(ncpu, "counting the possible CPUs");
	}
	values = calloc(ncpu, sizeof(*values));
	if (!values)
		return PyErr_NoMemory();
	if (bpf_map_lookup_elem(m->fd, &index, values)) {
		int err = errno;
		free(values);
		return os_error(err, "reading a BPF counter");
	}
	for (int i = 0; i < ncpu; i++)
		total += values[i];
	free(values);
	return PyLong_FromUnsignedLongLong(total);
}

static PyObject *map_close(MapObject *m, PyObject *unused)
{
	if (m->fd >= 0) {
		close(m->fd);
		m->fd = -1;
	}
	Py_RETURN_NONE;
}

static PyObject *map_get_name(MapObject *m, void *c) { return PyUnicode_FromString(m->info.name); }
static PyObject *map_get_id(MapObject *m, void *c) { return PyLong_FromUnsignedLong(m->info.id); }
static PyObject *map_get_key_size(MapObject *m, void *c) { return PyLong_FromUnsignedLong(m->info.key_size); }
static PyObject *map_get_value_size(MapObject *m, void *c) { return PyLong_FromUnsignedLong(m->info.value_size); }
static PyObject *map_get_max_entries(MapObject *m, void *c) { return PyLong_FromUnsignedLong(m->info.max_entries); }

static PyMethodDef map_methods[] = {
	{"update", (PyCFunction)map_update, METH_VARARGS, map_update_doc},
	{"delete", (PyCFunction)map_delete, METH_VARARGS, map_delete_doc},
	{"keys", (PyCFunction)map_keys, METH_NOARGS, map_keys_doc},
	{"sum_u64", (PyCFunction)map_sum, METH_VARARGS, map_sum_doc},
	{"close", (PyCFunction)map_close, METH_NOARGS, "close() -> None"},
	{NULL}
};

static PyGetSetDef map_getset[] = {
	{"name", (getter)map_get_name, NULL, "the map's name", NULL},
	{"id", (getter)map_get_id, NULL, "the kernel's id of the map", NULL},
	{"key_size", (getter)map_get_key_size, NULL, "bytes per key", NULL},
	{"value_size", (getter)map_get_value_size, NULL, "bytes per value", NULL},
	{"max_entries", (getter)map_get_max_entries, NULL, "capacity", NULL},
	{NULL}
};

static PyTypeObject MapType = {
	PyVarObject_HEAD_INIT(NULL, 0)
	.tp_name = "pylvs._bpf.Map",
	.tp_basicsize = sizeof(MapObject),
	.tp_dealloc = (destructor)map_dealloc,
	.tp_flags = Py_TPFLAGS_DEFAULT,
	.tp_doc = "A BPF map, by its own file descriptor.",
	.tp_methods = map_methods,
	.tp_getset = map_getset,
};

/* ---- Link ----------------------------------------------------------------- */

typedef struct {
	PyObject_HEAD
	int fd;
	unsigned int id, prog_id, ifindex;
} LinkObject;

static PyTypeObject LinkType;

static void link_dealloc(LinkObject *l)
{
	if (l->fd >= 0)
		close(l->fd);
	Py_TYPE(l)->tp_free((PyObject *)l);
}

static PyObject *link_close(LinkObject *l, PyObject *unused)
{
	/* The last reference: the kernel detaches the program now. */
	if (l->fd >= 0) {
		close(l->fd);
		l->fd = -1;
	}
	Py_RETURN_NONE;
}

static PyObject *link_get_id(LinkObject *l, void *c) { return PyLong_FromUnsignedLong(l->id); }
static PyObject *link_get_prog_id(LinkObject *l, void *c) { return PyLong_FromUnsignedLong(l->prog_id); }
static PyObject *link_get_ifindex(LinkObject *l, void *c) { return PyLong_FromUnsignedLong(l->ifindex); }
static PyObject *link_get_closed(LinkObject *l, void *c) { return PyBool_FromLong(l->fd < 0); }

static PyMethodDef link_methods[] = {
	{"close", (PyCFunction)link_close, METH_NOARGS, "close() -> None: detach"},
	{NULL}
};

static PyGetSetDef link_getset[] = {
	{"id", (getter)link_get_id, NULL, "the kernel's id of the link", NULL},
	{"prog_id", (getter)link_get_prog_id, NULL, "the attached program's id", NULL},
	{"ifindex", (getter)link_get_ifindex, NULL, "the interface", NULL},
	{"closed", (getter)link_get_closed, NULL, "True once closed", NULL},
	{NULL}
};

static PyTypeObject LinkType = {
	PyVarObject_HEAD_INIT(NULL, 0)
	.tp_name = "pylvs._bpf.Link",
	.tp_basicsize = sizeof(LinkObject),
	.tp_dealloc = (destructor)link_dealloc,
	.tp_flags = Py_TPFLAGS_DEFAULT,
	.tp_doc = "A BPF link: the program stays attached while this is open.",
	.tp_methods = link_methods,
	.tp_getset = link_getset,
};

/* ---- Object --------------------------------------------------------------- */

typedef struct {
	PyObject_HEAD
	struct bpf_object *obj;
} ObjectObject;

static int object_init(ObjectObject *self, PyObject *args, PyObject *kw)
{
	static char *names[] = {"path", "max_entries", NULL};
	const char *path;
	PyObject *sizes = NULL, *k, *v;
	Py_ssize_t pos = 0;
	int err;

	if (!PyArg_ParseTupleAndKeywords(args, kw, "s|O!", names, &path, &PyDict_Type, &sizes))
		return -1;
	if (self->obj)
		bpf_object__close(self->obj);
	last_log[0] = '\0';
	self->obj = bpf_object__open_file(path, NULL);
	if (!self->obj) {
		char what[600];
		snprintf(what, sizeof(what), "opening BPF object %s", path);
		os_error(errno, what);
		return -1;
	}
	while (sizes && PyDict_Next(sizes, &pos, &k, &v)) {
		const char *name = PyUnicode_AsUTF8(k);
		unsigned long n = PyLong_AsUnsignedLong(v);
		struct bpf_map *map;

		if (!name || PyErr_Occurred())
			return -1;
		map = bpf_object__find_map_by_name(self->obj, name);
		if (!map) {
			PyErr_Format(PyExc_KeyError, "BPF object %s has no map %s", path, name);
			return -1;
		}
		if (n < 1 || n > 0xffffffffUL) {
			PyErr_Format(PyExc_ValueError, "map %s: max_entries %lu out of range", name, n);
			return -1;
		}
		bpf_map__set_max_entries(map, (__u32)n);
	}
	err = bpf_object__load(self->obj);
	if (err) {
		char what[600];
		snprintf(what, sizeof(what), "loading BPF object %s", path);
		os_error(err, what);
		return -1;
	}
	last_log[0] = '\0';
	return 0;
}

static void object_dealloc(ObjectObject *self)
{
	if (self->obj)
		bpf_object__close(self->obj);
	Py_TYPE(self)->tp_free((PyObject *)self);
}

static int object_open(ObjectObject *self)
{
	if (!self->obj) {
		PyErr_SetString(PyExc_ValueError, "BPF object is closed");
		return 0;
	}
	return 1;
}

PyDoc_STRVAR(object_map_doc,
"map(name: str) -> Map\n\nThe named map, with its own file descriptor. KeyError if none.");

static PyObject *object_map(ObjectObject *self, PyObject *args)
{
	const char *name;
	struct bpf_map *map;
	int fd;

	if (!object_open(self) || !PyArg_ParseTuple(args, "s", &name))
		return NULL;
	map = bpf_object__find_map_by_name(self->obj, name);
	if (!map)
		return PyErr_Format(PyExc_KeyError, "no BPF map %s", name);
	fd = fcntl(bpf_map__fd(map), F_DUPFD_CLOEXEC, 3);
	if (fd < 0)
		return os_error(errno, "duplicating a BPF map fd");
	return map_new_from_fd(fd);
}

static PyObject *link_from_fd(int fd, unsigned int ifindex)
{
	struct bpf_link_info info;
	__u32 len = sizeof(info);
	LinkObject *l;

	memset(&info, 0, sizeof(info));
	if (bpf_obj_get_info_by_fd(fd, &info, &len)) {
		int err = errno;
		close(fd);
		return os_error(err, "reading a BPF link's info");
	}
	l = PyObject_New(LinkObject, &LinkType);
	if (!l) {
		close(fd);
		return NULL;
	}
	l->fd = fd;
	l->id = info.id;
	l->prog_id = info.prog_id;
	l->ifindex = ifindex;
	return (PyObject *)l;
}

PyDoc_STRVAR(object_attach_doc,
"attach_tcx_ingress(prog: str, ifindex: int) -> Link\n\n"
"Attach the named program first in the tc ingress (tcx) chain of the\n"
"interface, through a new BPF link (kernel 6.6 or later). OSError as the\n"
"kernel refused (EINVAL: no tcx; EPERM: no CAP_BPF/CAP_NET_ADMIN; ENODEV).");

static PyObject *object_attach(ObjectObject *self, PyObject *args)
{
	const char *name;
	unsigned int ifindex;
	struct bpf_program *prog;
	union { union bpf_attr attr; char room[256]; } a;
	int fd;

	if (!object_open(self) || !PyArg_ParseTuple(args, "sI", &name, &ifindex))
		return NULL;
	prog = bpf_object__find_program_by_name(self->obj, name);
	if (!prog)
		return PyErr_Format(PyExc_KeyError, "no BPF program %s", name);
	memset(&a, 0, sizeof(a));
	a.attr.link_create.prog_fd = bpf_program__fd(prog);
	a.attr.link_create.target_ifindex = ifindex;
	a.attr.link_create.attach_type = TCX_INGRESS;
	a.attr.link_create.flags = ATTACH_BEFORE;
	fd = sys_bpf(BPF_LINK_CREATE, &a, sizeof(a.attr));
	if (fd < 0) {
		char what[128];
		snprintf(what, sizeof(what), "attaching %s at tcx ingress of ifindex %u", name, ifindex);
		return os_error(errno, what);
	}
	return link_from_fd(fd, ifindex);
}

PyDoc_STRVAR(object_attach_xdp_doc,
"attach_xdp(prog: str, ifindex: int, generic: bool = False) -> Link\n\n"
"Attach the named XDP program to the interface through a new BPF link:\n"
"in the driver (native mode), or in the generic skb path when generic.\n"
"OSError as the kernel refused (EOPNOTSUPP: no native XDP in the driver;\n"
"EBUSY/EEXIST: another XDP program is attached; EPERM; ENODEV).");

static PyObject *object_attach_xdp(ObjectObject *self, PyObject *args)
{
	const char *name;
	unsigned int ifindex;
	int generic = 0;
	struct bpf_program *prog;
	LIBBPF_OPTS(bpf_link_create_opts, opts);
	int fd;

	if (!object_open(self) || !PyArg_ParseTuple(args, "sI|p", &name, &ifindex, &generic))
		return NULL;
	prog = bpf_object__find_program_by_name(self->obj, name);
	if (!prog)
		return PyErr_Format(PyExc_KeyError, "no BPF program %s", name);
	opts.flags = generic ? XDP_FLAGS_SKB_MODE : XDP_FLAGS_DRV_MODE;
	fd = bpf_link_create(bpf_program__fd(prog), (int)ifindex, BPF_XDP, &opts);
	if (fd < 0) {
		char what[128];
		snprintf(what, sizeof(what), "attaching %s (%s XDP) to ifindex %u", name,
			 generic ? "generic" : "native", ifindex);
		return os_error(errno, what);
	}
	return link_from_fd(fd, ifindex);
}

/* The loaded program's fd (the object keeps it); -1 with KeyError when the
 * object has no such program, or ValueError when it is closed. */
static int program_fd(ObjectObject *self, const char *name)
{
	struct bpf_program *prog;

	if (!object_open(self))
		return -1;
	prog = bpf_object__find_program_by_name(self->obj, name);
	if (!prog) {
		PyErr_Format(PyExc_KeyError, "no BPF program %s", name);
		return -1;
	}
	return bpf_program__fd(prog);
}

PyDoc_STRVAR(object_attach_tun_doc,
"attach_tun_steering(prog: str, fd: int) -> int\n\n"
"Make the named socket-filter program the steering program of the TUN/TAP\n"
"device that ``fd`` (one of its queues) belongs to (TUNSETSTEERINGEBPF):\n"
"drivers/net/tun.c then picks each transmitted frame's queue as the program's\n"
"return value modulo the queues attached. The device holds the program until\n"
"another replaces it or it is detached (fd -1 through the same ioctl). Returns\n"
"the program's id. OSError as the kernel refused (EINVAL: not a socket filter\n"
"program; EBADFD: fd is not attached to a device).");

/* The id of the program behind prog_fd into *id; -1 with OSError set. */
static int program_id(int prog_fd, __u32 *id)
{
	struct bpf_prog_info info = {0};
	__u32 len = sizeof(info);

	if (bpf_obj_get_info_by_fd(prog_fd, &info, &len)) {
		os_error(errno, "reading a BPF program's info");
		return -1;
	}
	*id = info.id;
	return 0;
}

static PyObject *object_attach_tun(ObjectObject *self, PyObject *args)
{
	const char *name;
	int fd, prog_fd;
	__u32 id;

	if (!PyArg_ParseTuple(args, "si", &name, &fd) || (prog_fd = program_fd(self, name)) < 0)
		return NULL;
	if (ioctl(fd, TUNSETSTEERINGEBPF, &prog_fd) < 0) {
		char what[128];
		snprintf(what, sizeof(what), "setting %s as steering program of TAP fd %d", name, fd);
		return os_error(errno, what);
	}
	if (program_id(prog_fd, &id) < 0)
		return NULL;
	return PyLong_FromUnsignedLong(id);
}

PyDoc_STRVAR(object_prog_fd_doc,
"prog_fd(prog: str) -> (fd, id)\n\n"
"A new close-on-exec descriptor of the named program, the caller's to close,\n"
"and the program's id: for attachments made through a socket option, such\n"
"as PACKET_FANOUT_DATA of a PACKET_FANOUT_EBPF group, which take the program\n"
"by descriptor and hold it themselves. OSError when it cannot be duplicated.");

static PyObject *object_prog_fd(ObjectObject *self, PyObject *args)
{
	const char *name;
	int prog_fd, fd;
	__u32 id;

	if (!PyArg_ParseTuple(args, "s", &name) || (prog_fd = program_fd(self, name)) < 0 ||
	    program_id(prog_fd, &id) < 0)
		return NULL;
	fd = fcntl(prog_fd, F_DUPFD_CLOEXEC, 3);
	if (fd < 0)
		return os_error(errno, "duplicating a BPF program's descriptor");
	return Py_BuildValue("(iI)", fd, id);
}

static PyObject *object_close(ObjectObject *self, PyObject *unused)
{
	/* Links keep their program: closing the object detaches nothing. */
	if (self->obj) {
		bpf_object__close(self->obj);
		self->obj = NULL;
	}
	Py_RETURN_NONE;
}

static PyMethodDef object_methods[] = {
	{"map", (PyCFunction)object_map, METH_VARARGS, object_map_doc},
	{"attach_tcx_ingress", (PyCFunction)object_attach, METH_VARARGS, object_attach_doc},
	{"attach_xdp", (PyCFunction)object_attach_xdp, METH_VARARGS, object_attach_xdp_doc},
	{"attach_tun_steering", (PyCFunction)object_attach_tun, METH_VARARGS,
	 object_attach_tun_doc},
	{"prog_fd", (PyCFunction)object_prog_fd, METH_VARARGS, object_prog_fd_doc},
	{"close", (PyCFunction)object_close, METH_NOARGS, "close() -> None"},
	{NULL}
};

static PyTypeObject ObjectType = {
	PyVarObject_HEAD_INIT(NULL, 0)
	.tp_name = "pylvs._bpf.Object",
	.tp_basicsize = sizeof(ObjectObject),
	.tp_dealloc = (destructor)object_dealloc,
	.tp_flags = Py_TPFLAGS_DEFAULT,
	.tp_doc = "Object(path, max_entries={}): a compiled BPF object, opened and loaded.\n"
		  "OSError with libbpf's words when it cannot be loaded.",
	.tp_methods = object_methods,
	.tp_init = (initproc)object_init,
	.tp_new = PyType_GenericNew,
};

/* ---- module functions ----------------------------------------------------- */

PyDoc_STRVAR(tcx_query_doc,
"tcx_query(ifindex: int, egress: bool = False) -> list[int]\n\n"
"Ids of the programs attached at tcx ingress (or egress) of the interface,\n"
"first to last; [] when none (or the kernel has no tcx).");

static PyObject *tcx_query(PyObject *mod, PyObject *args)
{
	unsigned int ifindex;
	int egress = 0;
	__u32 ids[MAX_QUERY];
	union { union bpf_attr attr; char room[256]; } a;
	PyObject *out;

	if (!PyArg_ParseTuple(args, "I|p", &ifindex, &egress))
		return NULL;
	memset(&a, 0, sizeof(a));
	a.attr.query.target_fd = ifindex;
	a.attr.query.attach_type = egress ? TCX_EGRESS : TCX_INGRESS;
	a.attr.query.prog_ids = (__u64)(unsigned long)ids;
	a.attr.query.prog_cnt = MAX_QUERY;
	/* The kernel writes its revision past the 6.1 layout: give it room. */
	if (sys_bpf(BPF_PROG_QUERY, &a, sizeof(a)) < 0) {
		if (errno == EINVAL)
			return PyList_New(0);
		return os_error(errno, "querying tcx programs");
	}
	out = PyList_New(0);
	for (__u32 i = 0; out && i < a.attr.query.prog_cnt && i < MAX_QUERY; i++) {
		PyObject *v = PyLong_FromUnsignedLong(ids[i]);
		if (!v || PyList_Append(out, v)) {
			Py_XDECREF(v);
			Py_CLEAR(out);
		}
		Py_XDECREF(v);
	}
	return out;
}

PyDoc_STRVAR(prog_info_doc,
"prog_info(prog_id: int) -> dict\n\n"
"{'name': str, 'map_ids': list[int]} of a loaded program.");

static PyObject *prog_info(PyObject *mod, PyObject *args)
{
	unsigned int id;
	__u32 map_ids[64];
	struct bpf_prog_info info;
	__u32 len = sizeof(info);
	PyObject *ids;
	int fd;

	if (!PyArg_ParseTuple(args, "I", &id))
		return NULL;
	fd = bpf_prog_get_fd_by_id(id);
	if (fd < 0)
		return os_error(errno, "opening a BPF program by id");
	memset(&info, 0, sizeof(info));
	info.nr_map_ids = 64;
	info.map_ids = (__u64)(unsigned long)map_ids;
	if (bpf_obj_get_info_by_fd(fd, &info, &len)) {
		int err = errno;
		close(fd);
		return os_error(err, "reading a BPF program's info");
	}
	close(fd);
	ids = PyList_New(0);
	for (__u32 i = 0; ids && i < info.nr_map_ids && i < 64; i++) {
		PyObject *v = PyLong_FromUnsignedLong(map_ids[i]);
		if (!v || PyList_Append(ids, v))
			Py_CLEAR(ids);
		Py_XDECREF(v);
	}
	if (!ids)
		return NULL;
	return Py_BuildValue("{s:s,s:N}", "name", info.name, "map_ids", ids);
}

PyDoc_STRVAR(prog_test_run_doc,
"prog_test_run(prog_id: int, frame: bytes) -> int\n\n"
"Run a loaded program once on ``frame`` (an Ethernet frame; for a tc program\n"
"the kernel builds an skb on this namespace's loopback, so a frame to MAC\n"
"00:00:00:00:00:00 is PACKET_HOST) and return its verdict (BPF_PROG_TEST_RUN).");

static PyObject *prog_test_run(PyObject *mod, PyObject *args)
{
	unsigned int id;
	Py_buffer frame;
	int fd, err;
	LIBBPF_OPTS(bpf_test_run_opts, opts);

	if (!PyArg_ParseTuple(args, "Iy*", &id, &frame))
		return NULL;
	fd = bpf_prog_get_fd_by_id(id);
	if (fd < 0) {
		PyBuffer_Release(&frame);
		return os_error(errno, "opening a BPF program by id");
	}
	opts.data_in = frame.buf;
	opts.data_size_in = (__u32)frame.len;
	opts.repeat = 1;
	err = bpf_prog_test_run_opts(fd, &opts);
	err = err ? errno : 0;
	close(fd);
	PyBuffer_Release(&frame);
	if (err)
		return os_error(err, "test-running a BPF program");
	return PyLong_FromUnsignedLong(opts.retval);
}

PyDoc_STRVAR(xdp_query_doc,
"xdp_query(ifindex: int) -> dict\n\n"
"{'prog_id': int, 'mode': str, 'link': bool} of the XDP program attached to\n"
"the interface (prog_id 0, mode 'none' when there is none); 'link': it is\n"
"held by a BPF link (else attached by netlink, which outlives its owner).");

static PyObject *xdp_query(PyObject *mod, PyObject *args)
{
	unsigned int ifindex;
	LIBBPF_OPTS(bpf_xdp_query_opts, opts);
	static const char *modes[] = {"none", "native", "generic", "offload", "multi"};
	int link = 0;

	if (!PyArg_ParseTuple(args, "I", &ifindex))
		return NULL;
	if (bpf_xdp_query((int)ifindex, 0, &opts))
		return os_error(errno, "querying the XDP program of an interface");
	if (opts.prog_id) {
		/* Netlink does not say who holds the program: walk the links. */
		__u32 id = 0;
		while (!bpf_link_get_next_id(id, &id)) {
			struct bpf_link_info info;
			__u32 len = sizeof(info);
			int fd = bpf_link_get_fd_by_id(id);

			if (fd < 0)
				continue;
			memset(&info, 0, sizeof(info));
			if (!bpf_obj_get_info_by_fd(fd, &info, &len) && info.type == BPF_LINK_TYPE_XDP
			    && info.xdp.ifindex == ifindex && info.prog_id == opts.prog_id)
				link = 1;
			close(fd);
			if (link)
				break;
		}
	}
	return Py_BuildValue("{s:I,s:s,s:O}", "prog_id", opts.prog_id, "mode",
			     opts.attach_mode < 5 ? modes[opts.attach_mode] : "unknown",
			     "link", link ? Py_True : Py_False);
}

PyDoc_STRVAR(xdp_detach_doc,
"xdp_detach(ifindex: int, prog_id: int, generic: bool = False) -> None\n\n"
"Detach the XDP program prog_id, attached by netlink in native (or generic)\n"
"mode, from the interface if it is still the one there (OSError EEXIST\n"
"otherwise; a program held by a link cannot be detached this way).");

static PyObject *xdp_detach(PyObject *mod, PyObject *args)
{
	unsigned int ifindex, prog_id;
	int generic = 0;
	LIBBPF_OPTS(bpf_xdp_attach_opts, opts);

	if (!PyArg_ParseTuple(args, "II|p", &ifindex, &prog_id, &generic))
		return NULL;
	opts.old_prog_fd = bpf_prog_get_fd_by_id(prog_id);
	if (opts.old_prog_fd < 0)
		return os_error(errno, "opening an XDP program by id");
	int err = bpf_xdp_detach((int)ifindex, XDP_FLAGS_REPLACE
				 | (generic ? XDP_FLAGS_SKB_MODE : XDP_FLAGS_DRV_MODE), &opts);
	close(opts.old_prog_fd);
	if (err)
		return os_error(err, "detaching an XDP program");
	Py_RETURN_NONE;
}

PyDoc_STRVAR(map_from_id_doc, "map_from_id(map_id: int) -> Map\n\nOpen a loaded map by its id.");

static PyObject *map_from_id(PyObject *mod, PyObject *args)
{
	unsigned int id;
	int fd;

	if (!PyArg_ParseTuple(args, "I", &id))
		return NULL;
	fd = bpf_map_get_fd_by_id(id);
	if (fd < 0)
		return os_error(errno, "opening a BPF map by id");
	return map_new_from_fd(fd);
}

static PyMethodDef module_methods[] = {
	{"tcx_query", tcx_query, METH_VARARGS, tcx_query_doc},
	{"prog_info", prog_info, METH_VARARGS, prog_info_doc},
	{"map_from_id", map_from_id, METH_VARARGS, map_from_id_doc},
	{"xdp_query", xdp_query, METH_VARARGS, xdp_query_doc},
	{"xdp_detach", xdp_detach, METH_VARARGS, xdp_detach_doc},
	{"prog_test_run", prog_test_run, METH_VARARGS, prog_test_run_doc},
	{NULL}
};

static struct PyModuleDef module = {
	PyModuleDef_HEAD_INIT, "pylvs._bpf",
	"Load BPF objects, attach them at tcx ingress through links, update their maps.",
	-1, module_methods,
};

PyMODINIT_FUNC PyInit__bpf(void)
{
	PyObject *m;

	libbpf_set_print(keep_log);
	if (PyType_Ready(&MapType) || PyType_Ready(&LinkType) || PyType_Ready(&ObjectType))
		return NULL;
	m = PyModule_Create(&module);
	if (!m)
		return NULL;
	Py_INCREF(&MapType);
	Py_INCREF(&LinkType);
	Py_INCREF(&ObjectType);
	if (PyModule_AddObject(m, "Map", (PyObject *)&MapType)
	    || PyModule_AddObject(m, "Link", (PyObject *)&LinkType)
	    || PyModule_AddObject(m, "Object", (PyObject *)&ObjectType)) {
		Py_DECREF(m);
		return NULL;
	}
	return m;
}
