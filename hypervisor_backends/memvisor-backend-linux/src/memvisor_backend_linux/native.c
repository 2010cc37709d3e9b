/* memvisor-backend-linux: the compiled part. Python decides, this copies.
 *
 * - userfaultfd set-up for the guest process (open, API handshake, register);
 * - block-sized resolutions (UFFDIO_COPY / ZEROPAGE / CONTINUE / WRITEPROTECT / WAKE over runs
 *   of consecutive pages: one ioctl per run), retrying on EAGAIN and waking on EEXIST;
 * - the fault loop mv_serve: waits on the uffd and the guest's socket with the GIL released,
 *   serves the faults that the per-page state table already resolves (minor faults of present
 *   pages, missing faults of staged pages) and hands the rest back to Python in one batch;
 * - benchmark helpers: timed page touches (guest side) and a two-thread wake-up round trip.
 *
 * Constants and structures come from <linux/userfaultfd.h>; the few that older headers lack
 * are defined below with the values of the kernel's uapi header.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif
#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif
#ifndef UFFDIO_CONTINUE_MODE_WP
#define UFFDIO_CONTINUE_MODE_WP ((__u64)1 << 1)
#endif
#ifndef FALLOC_FL_KEEP_SIZE
#define FALLOC_FL_KEEP_SIZE 0x01
#endif
#ifndef FALLOC_FL_PUNCH_HOLE
#define FALLOC_FL_PUNCH_HOLE 0x02
#endif

#define MV_PAGE 4096ULL

/* Per-page state bits, shared with Python (backend.py). */
#define ST_PRESENT 1
#define ST_TRACED 2
#define ST_PROTECTED 4
#define ST_STAGED 8
#define ST_WPASYNC 16 /* install write-protected: async WP tracks writes (dirty bits) */
#define ST_ZERO 32    /* mapped onto a zero page: a hole, or a zero-filled page kept write-protected */

/* Event flags handed back to Python. */
#define EV_WRITE 1
#define EV_WP 2
#define EV_MINOR 4

/* -- set-up (guest side) ------------------------------------------------------------------- */

int mv_uffd_open(int flags)
{
    int fd = (int)syscall(SYS_userfaultfd, flags);
    if (fd >= 0)
        return fd;
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev < 0)
        return -errno;
    fd = ioctl(dev, USERFAULTFD_IOC_NEW, flags);
    int err = errno;
    close(dev);
    return fd >= 0 ? fd : -err;
}

int mv_uffd_api(int fd, uint64_t features, uint64_t *got_features, uint64_t *got_ioctls)
{
    struct uffdio_api api = {.api = UFFD_API, .features = features};
    if (ioctl(fd, UFFDIO_API, &api) < 0)
        return -errno;
    *got_features = api.features;
    *got_ioctls = api.ioctls;
    return 0;
}

int mv_uffd_register(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *ioctls)
{
    struct uffdio_register reg = {.range = {.start = start, .len = len}, .mode = mode};
    if (ioctl(fd, UFFDIO_REGISTER, &reg) < 0)
        return -errno;
    *ioctls = reg.ioctls;
    return 0;
}

/* Die with SIGKILL when the parent dies; -1 if it died already (the race before prctl). */
int mv_die_with_parent(int expected_parent)
{
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) < 0)
        return -errno;
    return getppid() == expected_parent ? 0 : -1;
}

int mv_punch_hole(int fd, uint64_t offset, uint64_t len)
{
    return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)offset, (off_t)len) < 0 ? -errno : 0;
}

int mv_allocate(int fd, uint64_t offset, uint64_t len)
{
    return fallocate(fd, 0, (off_t)offset, (off_t)len) < 0 ? -errno : 0;
}

/* Map fd's first size bytes MAP_SHARED at a 2 MiB-aligned address (so that the kernel can map
 * its shmem THPs with PMDs); returns the address or -errno. */
int64_t mv_map_aligned(int fd, uint64_t size, int prot)
{
    const uint64_t align = 2ULL << 20;
    void *p = mmap(NULL, size + align, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED)
        return -errno;
    uint64_t lo = (uint64_t)(uintptr_t)p, a = (lo + align - 1) & ~(align - 1), hi = lo + size + align;
    void *q = mmap((void *)(uintptr_t)a, size, prot, MAP_SHARED | MAP_FIXED, fd, 0);
    if (q == MAP_FAILED) {
        int err = errno;
        munmap(p, size + align);
        return -err;
    }
    if (a > lo)
        munmap(p, a - lo);
    if (hi > a + size)
        munmap((void *)(uintptr_t)(a + size), hi - (a + size));
    return (int64_t)a;
}

int mv_madvise(uint64_t addr, uint64_t len, int advice)
{
    return madvise((void *)(uintptr_t)addr, len, advice) < 0 ? -errno : 0;
}

/* -- resolutions ---------------------------------------------------------------------------- */

static int wake(int uffd, uint64_t start, uint64_t len)
{
    struct uffdio_range r = {.start = start, .len = len};
    return ioctl(uffd, UFFDIO_WAKE, &r) < 0 ? -errno : 0;
}

/* Kinds of resolution. */
#define RES_COPY 0
#define RES_ZERO 1
#define RES_CONTINUE 2

/* Resolve [dst, dst+len) with one ioctl; on EAGAIN continue after what was done, on EEXIST
 * (the first page is there already) wake it and skip it. Returns 0 or -errno. */
static int resolve_range(int uffd, int kind, uint64_t dst, uint64_t src, uint64_t len, int wp, uint64_t *ioctls)
{
    int spins = 0;
    while (len) {
        int64_t done;
        int rc;
        if (kind == RES_COPY) {
            struct uffdio_copy c = {.dst = dst, .src = src, .len = len, .mode = wp ? UFFDIO_COPY_MODE_WP : 0};
            rc = ioctl(uffd, UFFDIO_COPY, &c);
            done = c.copy;
        } else if (kind == RES_ZERO) {
            struct uffdio_zeropage z = {.range = {.start = dst, .len = len}, .mode = 0};
            rc = ioctl(uffd, UFFDIO_ZEROPAGE, &z);
            done = z.zeropage;
        } else {
            struct uffdio_continue c = {.range = {.start = dst, .len = len}, .mode = wp ? UFFDIO_CONTINUE_MODE_WP : 0};
            rc = ioctl(uffd, UFFDIO_CONTINUE, &c);
            done = c.mapped;
        }
        (*ioctls)++;
        if (rc == 0)
            return 0;
        int err = errno;
        if (err == EAGAIN) {
            if (done > 0) {
                dst += (uint64_t)done;
                src += (uint64_t)done;
                len -= (uint64_t)done;
            } else if (++spins > 1000000) {
                return -EAGAIN;
            }
            continue;
        }
        if (err == EEXIST) {
            wake(uffd, dst, MV_PAGE);
            dst += MV_PAGE;
            src += MV_PAGE;
            len -= MV_PAGE;
            continue;
        }
        return -err;
    }
    return 0;
}

/* Resolve pages gpps[0..n) (guest memory at base), src rows in the same order (COPY), one
 * ioctl per run of consecutive pages. Returns the number of ioctls made, or -errno. */
int64_t mv_resolve_runs(int uffd, int kind, uint64_t base, const int64_t *gpps, int64_t n, const uint8_t *src, int wp)
{
    uint64_t ioctls = 0;
    int64_t i = 0;
    while (i < n) {
        int64_t j = i + 1;
        while (j < n && gpps[j] == gpps[j - 1] + 1)
            j++;
        uint64_t s = src ? (uint64_t)(uintptr_t)(src + (uint64_t)i * MV_PAGE) : 0;
        int rc = resolve_range(uffd, kind, base + (uint64_t)gpps[i] * MV_PAGE, s, (uint64_t)(j - i) * MV_PAGE, wp, &ioctls);
        if (rc < 0)
            return rc;
        i = j;
    }
    return (int64_t)ioctls;
}

/* Write-protect (wp=1) or unprotect (wp=0, waking waiters) runs of pages. */
int64_t mv_protect_runs(int uffd, uint64_t base, const int64_t *gpps, int64_t n, int wp)
{
    int64_t i = 0, calls = 0;
    while (i < n) {
        int64_t j = i + 1;
        while (j < n && gpps[j] == gpps[j - 1] + 1)
            j++;
        struct uffdio_writeprotect w = {
            .range = {.start = base + (uint64_t)gpps[i] * MV_PAGE, .len = (uint64_t)(j - i) * MV_PAGE},
            .mode = wp ? UFFDIO_WRITEPROTECT_MODE_WP : 0};
        for (;;) {
            if (ioctl(uffd, UFFDIO_WRITEPROTECT, &w) == 0)
                break;
            if (errno != EAGAIN)
                return -errno;
        }
        calls++;
        i = j;
    }
    return calls;
}

int64_t mv_wake_runs(int uffd, uint64_t base, const int64_t *gpps, int64_t n)
{
    int64_t i = 0, calls = 0;
    while (i < n) {
        int64_t j = i + 1;
        while (j < n && gpps[j] == gpps[j - 1] + 1)
            j++;
        int rc = wake(uffd, base + (uint64_t)gpps[i] * MV_PAGE, (uint64_t)(j - i) * MV_PAGE);
        if (rc < 0)
            return rc;
        calls++;
        i = j;
    }
    return calls;
}

int64_t mv_punch_runs(int fd, const int64_t *gpps, int64_t n)
{
    int64_t i = 0, calls = 0;
    while (i < n) {
        int64_t j = i + 1;
        while (j < n && gpps[j] == gpps[j - 1] + 1)
            j++;
        int rc = mv_punch_hole(fd, (uint64_t)gpps[i] * MV_PAGE, (uint64_t)(j - i) * MV_PAGE);
        if (rc < 0)
            return rc;
        calls++;
        i = j;
    }
    return calls;
}

/* -- dirty pages: async write-protect + PAGEMAP_SCAN ---------------------------------------- */

struct mv_pm_scan_arg {
    uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages;
    uint64_t category_inverted, category_mask, category_anyof_mask, return_mask;
};
struct mv_page_region {
    uint64_t start, end, categories;
};
#define MV_PAGEMAP_SCAN _IOWR('f', 16, struct mv_pm_scan_arg)
#define MV_PM_SCAN_WP_MATCHING (1 << 0)
#define MV_PM_SCAN_CHECK_WPASYNC (1 << 1)
#define MV_PAGE_IS_WRITTEN (1 << 1)

/* Pages of [start, end) written since they were last write-protected: dirty[(addr - base) /
 * page] = 1 for each, and write-protect them again, atomically (one walk of the guest's page
 * table through its /proc/PID/pagemap). Returns the pages found, or -errno. */
int64_t mv_take_written(int pagemap_fd, uint64_t base, uint64_t start, uint64_t end, uint8_t *dirty)
{
    struct mv_page_region vec[512];
    int64_t total = 0;
    while (start < end) {
        struct mv_pm_scan_arg a = {
            .size = sizeof a, .flags = MV_PM_SCAN_WP_MATCHING | MV_PM_SCAN_CHECK_WPASYNC,
            .start = start, .end = end, .vec = (uint64_t)(uintptr_t)vec, .vec_len = 512,
            .category_mask = MV_PAGE_IS_WRITTEN, .return_mask = MV_PAGE_IS_WRITTEN};
        long n = ioctl(pagemap_fd, MV_PAGEMAP_SCAN, &a);
        if (n < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            return -errno;
        }
        for (long i = 0; i < n; i++)
            for (uint64_t p = vec[i].start; p < vec[i].end; p += MV_PAGE) {
                dirty[(p - base) / MV_PAGE] = 1;
                total++;
            }
        if (a.walk_end <= start)
            break;
        start = a.walk_end;
    }
    return total;
}

/* -- the fault loop --------------------------------------------------------------------------- */

struct mv_serve_ctx {
    int uffd;
    int sock;
    uint64_t base;
    uint64_t npages;
    uint8_t *state;        /* per page ST_* bits, read and updated here */
    const uint8_t *stage;  /* staged contents (npages rows), or NULL */
    int64_t block_pages;   /* staged pages are resolved this many at a time (aligned) */
    /* faults for Python */
    int64_t *out_pages;
    uint8_t *out_flags;
    int64_t out_cap;
    int64_t out_n;
    /* traced touches served here (the access hook gets them from Python) */
    int64_t *log_pages;
    uint8_t *log_writes;
    int64_t log_cap;
    int64_t log_n;
    /* counters */
    int64_t served_minor;
    int64_t served_staged;
    int64_t ioctls;
    int64_t events;
};

#define SERVE_DONE 0     /* the socket is readable (a reply, or the guest hung up) */
#define SERVE_FAULTS 1   /* faults for Python in out_pages */
#define SERVE_TIMEOUT 2
#define SERVE_LOG_FULL 3
#define SERVE_ERROR (-1)

static int serve_event(struct mv_serve_ctx *c, const struct uffd_msg *m)
{
    if (m->event != UFFD_EVENT_PAGEFAULT)
        return 0;
    uint64_t flags = m->arg.pagefault.flags;
    uint64_t addr = m->arg.pagefault.address & ~(MV_PAGE - 1);
    if (addr < c->base)
        return 0;
    int64_t gpp = (int64_t)((addr - c->base) / MV_PAGE);
    if ((uint64_t)gpp >= c->npages)
        return 0;
    uint8_t st = c->state[gpp];
    uint8_t ev = (flags & UFFD_PAGEFAULT_FLAG_WRITE) ? EV_WRITE : 0;
    uint64_t ioctls = 0;
    if (flags & UFFD_PAGEFAULT_FLAG_WP) {
        ev |= EV_WP;
    } else if ((flags & UFFD_PAGEFAULT_FLAG_MINOR) && (st & ST_PRESENT)) {
        /* The page is in the memfd; its PTE was zapped (traced) or never made. */
        if (st & ST_TRACED) {
            if (c->log_n >= c->log_cap)
                return SERVE_LOG_FULL; /* the event is lost from the queue: Python wakes it */
            c->state[gpp] = st & ~ST_TRACED;
            c->log_pages[c->log_n] = gpp;
            c->log_writes[c->log_n] = ev & EV_WRITE;
            c->log_n++;
        }
        int rc = resolve_range(c->uffd, RES_CONTINUE, addr, 0, MV_PAGE, (st & (ST_PROTECTED | ST_WPASYNC | ST_ZERO)) != 0, &ioctls);
        c->ioctls += (int64_t)ioctls;
        if (rc < 0)
            return SERVE_ERROR;
        c->served_minor++;
        return 0;
    } else if (!(flags & UFFD_PAGEFAULT_FLAG_MINOR) && (st & ST_STAGED) && c->stage) {
        /* Missing page whose contents Python staged: resolve its whole block in one ioctl. */
        int64_t first = gpp, last = gpp + 1;
        if (c->block_pages > 1) {
            int64_t b0 = gpp - gpp % c->block_pages, b1 = b0 + c->block_pages;
            if ((uint64_t)b1 > c->npages)
                b1 = (int64_t)c->npages;
            while (first > b0 && (c->state[first - 1] & (ST_STAGED | ST_PRESENT | ST_TRACED | ST_PROTECTED)) == ST_STAGED)
                first--;
            while (last < b1 && (c->state[last] & (ST_STAGED | ST_PRESENT | ST_TRACED | ST_PROTECTED)) == ST_STAGED)
                last++;
        }
        int rc = resolve_range(c->uffd, RES_COPY, c->base + (uint64_t)first * MV_PAGE,
                               (uint64_t)(uintptr_t)(c->stage + (uint64_t)first * MV_PAGE),
                               (uint64_t)(last - first) * MV_PAGE, (st & (ST_PROTECTED | ST_WPASYNC)) != 0, &ioctls);
        c->ioctls += (int64_t)ioctls;
        if (rc < 0)
            return SERVE_ERROR;
        for (int64_t p = first; p < last; p++)
            c->state[p] = (c->state[p] & ~ST_STAGED) | ST_PRESENT;
        c->served_staged += last - first;
        return 0;
    }
    if (flags & UFFD_PAGEFAULT_FLAG_MINOR)
        ev |= EV_MINOR;
    if (c->out_n >= c->out_cap)
        return SERVE_FAULTS; /* cannot happen with out_cap >= npages * 2 */
    c->out_pages[c->out_n] = gpp;
    c->out_flags[c->out_n] = ev;
    c->out_n++;
    return 0;
}

/* Serve faults until the socket is readable (SERVE_DONE) or some fault needs Python
 * (SERVE_FAULTS: every pending event has been read; out_pages holds those for Python).
 * timeout_ms < 0 waits forever. */
int mv_serve(struct mv_serve_ctx *c, int timeout_ms)
{
    struct uffd_msg msgs[64];
    c->out_n = 0;
    for (;;) {
        struct pollfd p[2] = {{.fd = c->uffd, .events = POLLIN}, {.fd = c->sock, .events = POLLIN}};
        int r = poll(p, 2, timeout_ms);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return SERVE_ERROR;
        }
        if (r == 0)
            return SERVE_TIMEOUT;
        if (p[0].revents & POLLIN) {
            for (;;) { /* drain every pending event: they form one batch */
                ssize_t got = read(c->uffd, msgs, sizeof msgs);
                if (got < 0) {
                    if (errno == EAGAIN || errno == EWOULDBLOCK)
                        break;
                    if (errno == EINTR)
                        continue;
                    return SERVE_ERROR;
                }
                int n = (int)(got / (ssize_t)sizeof(struct uffd_msg));
                for (int i = 0; i < n; i++) {
                    c->events++;
                    int rc = serve_event(c, &msgs[i]);
                    if (rc == SERVE_ERROR)
                        return rc;
                    if (rc == SERVE_LOG_FULL) {
                        /* hand this one to Python as a plain fault so it is not lost */
                        c->out_pages[c->out_n] = (int64_t)(((msgs[i].arg.pagefault.address & ~(MV_PAGE - 1)) - c->base) / MV_PAGE);
                        c->out_flags[c->out_n] = EV_MINOR;
                        c->out_n++;
                    }
                }
                if (got < (ssize_t)sizeof msgs)
                    break;
            }
            if (c->out_n)
                return SERVE_FAULTS;
        }
        if (p[1].revents & (POLLIN | POLLHUP | POLLERR))
            return SERVE_DONE;
    }
}

/* -- benchmark helpers ------------------------------------------------------------------------ */

static inline int64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}

/* Touch (read one byte of) each page and record how long each touch took. */
void mv_touch_timed(const uint8_t *base, const int64_t *gpps, int64_t n, int64_t *ns_out)
{
    volatile uint8_t sink = 0;
    for (int64_t i = 0; i < n; i++) {
        int64_t t0 = now_ns();
        sink += *(volatile const uint8_t *)(base + (uint64_t)gpps[i] * MV_PAGE);
        ns_out[i] = now_ns() - t0;
    }
    (void)sink;
}

struct pingpong {
    int to_peer[2];
    int to_main[2];
    int64_t iters;
};

static void *pong(void *arg)
{
    struct pingpong *pp = arg;
    char b;
    for (int64_t i = 0; i < pp->iters; i++) {
        if (read(pp->to_peer[0], &b, 1) != 1)
            break;
        if (write(pp->to_main[1], &b, 1) != 1)
            break;
    }
    return NULL;
}

/* Two threads, each blocked in read() on a pipe, wake each other: per round trip ns in ns_out.
 * The floor of any fault round trip in which a sleeping thread wakes a handler that wakes it. */
int mv_wakeup_roundtrip(int64_t iters, int64_t *ns_out)
{
    struct pingpong pp = {.iters = iters};
    if (pipe2(pp.to_peer, O_CLOEXEC) < 0)
        return -errno;
    if (pipe2(pp.to_main, O_CLOEXEC) < 0) {
        close(pp.to_peer[0]);
        close(pp.to_peer[1]);
        return -errno;
    }
    pthread_t t;
    int rc = pthread_create(&t, NULL, pong, &pp);
    if (rc == 0) {
        char b = 1;
        for (int64_t i = 0; i < iters; i++) {
            int64_t t0 = now_ns();
            if (write(pp.to_peer[1], &b, 1) != 1 || read(pp.to_main[0], &b, 1) != 1) {
                rc = -EIO;
                break;
            }
            ns_out[i] = now_ns() - t0;
        }
        close(pp.to_peer[1]); /* unblocks the peer if we stopped early */
        pthread_join(t, NULL);
    } else {
        rc = -rc;
        close(pp.to_peer[1]);
    }
    close(pp.to_peer[0]);
    close(pp.to_main[0]);
    close(pp.to_main[1]);
    return rc;
}
