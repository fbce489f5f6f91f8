/*
 * FUSE passthrough for libfuse builds that predate it (Debian's 3.14; it arrived in 3.16).
 *
 * Loaded with LD_PRELOAD into the mount process, this wraps the two calls libfuse talks to
 * /dev/fuse with, read() and writev(), and changes two kinds of reply on their way to the kernel:
 *
 *   - INIT: if the kernel offers FUSE_PASSTHROUGH (Linux >= 6.9), accept it and set
 *     max_stack_depth, which libfuse 3.14 knows no field for; and accept FUSE_CACHE_SYMLINKS
 *     (pyfuse3 never asks for it), so `ls -l` through a symlink into rootfs/ is not one READLINK
 *     per entry;
 *   - OPEN: if the file handle Python chose carries FH_MAGIC in its top 16 bits, set
 *     FOPEN_PASSTHROUGH and the backing id (bits 32..47), registered beforehand by Python with
 *     the FUSE_DEV_IOC_BACKING_OPEN ioctl. The kernel then reads the backing file itself: a
 *     committed blob is read at the speed of a local file, without a request reaching us.
 *   - OPENDIR: if the handle carries DIR_MAGIC (a directory inside a layer, whose listing never
 *     changes), set FOPEN_CACHE_DIR and FOPEN_KEEP_CACHE: the kernel answers later listings.
 *
 * And it sends every large reply with the GIL released (see reply()).
 *
 * Nothing is touched until Python names the /dev/fuse descriptor (imagefs_pt_enable), and an
 * OPEN reply is changed only if its unique id was read as an OPEN(DIR) request on that descriptor.
 * It is also a (do-nothing) Python extension module, so setuptools builds and installs it.
 */
#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#define FUSE_OPEN 14
#define FUSE_INIT 26
#define FUSE_OPENDIR 27
#define FUSE_CACHE_SYMLINKS (1u << 23)
#define FUSE_INIT_EXT (1u << 30)
#define FUSE_PASSTHROUGH_FLAGS2 (1u << 5) /* 1ULL << 37 */
#define FOPEN_KEEP_CACHE (1u << 1)
#define FOPEN_CACHE_DIR (1u << 3)
#define FOPEN_PASSTHROUGH (1u << 7)
#define FH_MAGIC 0x5054ull  /* "PT" */
#define DIR_MAGIC 0x4344ull /* "CD" */
#define IN_HEADER 40
#define OUT_HEADER 16
#define SLOTS 4096

static ssize_t (*real_read)(int, void *, size_t);
static ssize_t (*real_writev)(int, const struct iovec *, int);

static int fuse_fd = -1;
static uint32_t stack_depth = 1;
static uint64_t init_unique;  /* the INIT request being answered, 0 when none */
static uint32_t offered, offered2; /* the kernel's INIT flags */
static int state;             /* 0: INIT not seen, 1: passthrough accepted, -1: not offered */
static uint64_t opens[SLOTS]; /* unique ids of OPEN requests in flight */

int imagefs_pt_enable(int fd, unsigned depth)
{
    stack_depth = depth;
    __atomic_store_n(&fuse_fd, fd, __ATOMIC_SEQ_CST);
    return 0;
}

int imagefs_pt_state(void)
{
    return __atomic_load_n(&state, __ATOMIC_SEQ_CST);
}

ssize_t read(int fd, void *buf, size_t count)
{
    if (!real_read)
        real_read = (ssize_t(*)(int, void *, size_t))dlsym(RTLD_NEXT, "read");
    ssize_t n = real_read(fd, buf, count);
    if (n >= IN_HEADER && fd == __atomic_load_n(&fuse_fd, __ATOMIC_RELAXED)) {
        const unsigned char *p = buf;
        uint32_t opcode;
        uint64_t unique;
        memcpy(&opcode, p + 4, 4);
        memcpy(&unique, p + 8, 8);
        if (opcode == FUSE_OPEN || opcode == FUSE_OPENDIR) {
            opens[unique % SLOTS] = unique;
        } else if (opcode == FUSE_INIT && n >= IN_HEADER + 20) {
            memcpy(&offered, p + IN_HEADER + 12, 4);
            memcpy(&offered2, p + IN_HEADER + 16, 4);
            if (!(offered & FUSE_INIT_EXT))
                offered2 = 0;
            init_unique = unique;
        }
    }
    return n;
}

/* Any other reply, sent with the GIL let go if it is large: a read's reply copies up to 1 MiB
 * into the kernel's page cache (~200 us here, 450 of them in a cold `cat` of 420 MiB), and
 * pyfuse3 sends it holding the GIL, so the threads receiving and hashing the next chunks would
 * wait on it. */
static ssize_t reply(int fd, const struct iovec *iov, int iovcnt)
{
    if (iov[1].iov_len < (64u << 10) || !Py_IsInitialized() || !PyGILState_Check())
        return real_writev(fd, iov, iovcnt);
    PyThreadState *ts = PyEval_SaveThread();
    ssize_t n = real_writev(fd, iov, iovcnt);
    int saved = errno;
    PyEval_RestoreThread(ts);
    errno = saved;
    return n;
}

ssize_t writev(int fd, const struct iovec *iov, int iovcnt)
{
    if (!real_writev)
        real_writev = (ssize_t(*)(int, const struct iovec *, int))dlsym(RTLD_NEXT, "writev");
    if (iovcnt != 2 || fd != __atomic_load_n(&fuse_fd, __ATOMIC_RELAXED) || iov[0].iov_len != OUT_HEADER)
        return real_writev(fd, iov, iovcnt);
    int32_t error;
    uint64_t unique;
    memcpy(&error, (const char *)iov[0].iov_base + 4, 4);
    memcpy(&unique, (const char *)iov[0].iov_base + 8, 8);
    if (error != 0)
        return real_writev(fd, iov, iovcnt);

    if (init_unique && unique == init_unique && iov[1].iov_len >= 40 && iov[1].iov_len <= 256) {
        unsigned char arg[256];
        uint32_t flags, flags2;
        int passthrough = (offered2 & FUSE_PASSTHROUGH_FLAGS2) != 0;
        memcpy(arg, iov[1].iov_base, iov[1].iov_len);
        memcpy(&flags, arg + 12, 4);
        memcpy(&flags2, arg + 32, 4);
        flags |= offered & FUSE_CACHE_SYMLINKS; /* our symlinks never change: let the kernel keep them */
        if (passthrough) {
            flags |= FUSE_INIT_EXT;
            flags2 |= FUSE_PASSTHROUGH_FLAGS2;
            memcpy(arg + 32, &flags2, 4);
            memcpy(arg + 36, &stack_depth, 4); /* max_stack_depth */
        }
        memcpy(arg + 12, &flags, 4);
        init_unique = 0;
        struct iovec out[2] = {iov[0], {arg, iov[1].iov_len}};
        ssize_t n = real_writev(fd, out, 2);
        __atomic_store_n(&state, n >= 0 && passthrough ? 1 : -1, __ATOMIC_SEQ_CST);
        return n;
    }

    if (iov[1].iov_len == 16 && opens[unique % SLOTS] == unique) {
        opens[unique % SLOTS] = 0;
        unsigned char arg[16];
        uint64_t fh;
        uint32_t open_flags;
        memcpy(arg, iov[1].iov_base, 16);
        memcpy(&fh, arg, 8);
        memcpy(&open_flags, arg + 8, 4);
        if ((fh >> 48) == FH_MAGIC) {
            int32_t backing_id = (int32_t)((fh >> 32) & 0xffff);
            open_flags |= FOPEN_PASSTHROUGH;
            memcpy(arg + 12, &backing_id, 4);
        } else if ((fh >> 48) == DIR_MAGIC) {
            open_flags |= FOPEN_CACHE_DIR | FOPEN_KEEP_CACHE;
        } else {
            return real_writev(fd, iov, iovcnt);
        }
        memcpy(arg + 8, &open_flags, 4);
        struct iovec out[2] = {iov[0], {arg, 16}};
        return real_writev(fd, out, 2);
    }
    return reply(fd, iov, iovcnt);
}

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_passthrough",
                                    "LD_PRELOAD shim that enables FUSE passthrough (see the C source).", -1, NULL};

PyMODINIT_FUNC PyInit__passthrough(void)
{
    return PyModule_Create(&module);
}
