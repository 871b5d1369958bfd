/*
 * icount.c - exact guest instruction counter for qemu-system-arm 7.2 (TCG plugin API v1).
 *
 * Part of mpq (mpq/firmware.py builds it with the host compiler on first use):
 *
 *     gcc -O2 -shared -fPIC -fvisibility=hidden -o icount.so icount.c
 *
 * Usage:
 *
 *     qemu-system-arm ... -plugin icount.so,start=0x1234,stop=0x1250,out=count.txt
 *
 * Every translated guest instruction gets an inline 64-bit add, so the count is exact even when
 * a translation block is left half way (exception, semihosting trap, fault). The instructions at
 * the addresses `start` and `stop` (the first instruction of two marker functions, Thumb bit
 * cleared) also get a callback: `start` opens a window, `stop` closes it and adds the
 * instructions executed in between to `window`. A `start` seen while a window is open is
 * ignored, so does a `stop` without one. At exit the plugin writes
 *
 *     total=<instructions executed>
 *     window=<instructions inside all windows>
 *     windows=<number of closed windows>
 *     open=<1 if a window was still open at exit, else 0>
 *
 * to the file named by `out` (stdout when there is none).
 *
 * Segments (`mpq verify --per-layer`): `marks=<file>` names a text file of lines
 * `<address> <id>` (id 1..65535; the addresses of zero-size labels the generated model code
 * places before each layer). Inside a window, reaching a marked instruction closes the current
 * segment and opens segment `id`; the window's start opens segment 0 (instructions before the
 * first mark) and its stop closes the current one. The instructions of each segment are summed
 * over all windows and written as `segment.<id>=<n>` for every id 0..max, so the segments add up
 * to `window` exactly.
 *
 * Debian ships no qemu-plugin.h, so the handful of API declarations used here are written out
 * below; they follow the plugin ABI of QEMU 7.2 (QEMU_PLUGIN_VERSION 1) and must be revisited
 * for another QEMU version.
 */
#include <inttypes.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- plugin ABI (QEMU 7.2) ----------------------------------------------------------------- */

#define MPQ_EXPORT __attribute__((visibility("default")))

typedef uint64_t plugin_id;
struct qemu_plugin_tb;
struct qemu_plugin_insn;

/* Only the leading members are read; the rest of QEMU's struct is never touched. */
struct plugin_info {
    const char *target_name;
    struct {
        int min;
        int cur;
    } version;
    bool system_emulation;
};

enum { CB_NO_REGS = 0 };         /* enum qemu_plugin_cb_flags */
enum { INLINE_ADD_U64 = 0 };     /* enum qemu_plugin_op */

typedef void (*tb_trans_fn)(plugin_id id, struct qemu_plugin_tb *tb);
typedef void (*vcpu_udata_fn)(unsigned int vcpu_index, void *udata);
typedef void (*udata_fn)(plugin_id id, void *udata);

extern void qemu_plugin_register_vcpu_tb_trans_cb(plugin_id id, tb_trans_fn cb);
extern size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *tb);
extern struct qemu_plugin_insn *qemu_plugin_tb_get_insn(const struct qemu_plugin_tb *tb,
                                                        size_t idx);
extern uint64_t qemu_plugin_insn_vaddr(const struct qemu_plugin_insn *insn);
extern void qemu_plugin_register_vcpu_insn_exec_inline(struct qemu_plugin_insn *insn, int op,
                                                       void *ptr, uint64_t imm);
extern void qemu_plugin_register_vcpu_insn_exec_cb(struct qemu_plugin_insn *insn,
                                                   vcpu_udata_fn cb, int flags, void *udata);
extern void qemu_plugin_register_atexit_cb(plugin_id id, udata_fn cb, void *udata);

MPQ_EXPORT int qemu_plugin_version = 1;

/* ---- state -------------------------------------------------------------------------------- */

#define NO_ADDR UINT64_MAX

static uint64_t total;            /* incremented inline before every guest instruction */
static uint64_t window;           /* instructions inside closed windows */
static uint64_t windows;          /* closed windows */
static uint64_t opened_at;        /* `total` when the open window started */
static bool is_open;
static uint64_t start_addr = NO_ADDR;
static uint64_t stop_addr = NO_ADDR;
static char *out_path;

/* Segments: marked addresses (sorted, for bsearch) and per-segment instruction sums. */
typedef struct {
    uint64_t addr;
    uint32_t id;
} mark_t;
static mark_t *marks;
static size_t n_marks;
static uint32_t max_id;
static uint64_t *segment;         /* [max_id + 1] */
static uint32_t current;          /* open segment inside a window */
static uint64_t segment_at;       /* `total` when `current` opened */

/* Marker callbacks: both see `total` at the same point relative to their own instruction, so the
 * difference is the number of instructions from the start marker up to the stop marker. */
static void on_start(unsigned int vcpu_index, void *udata)
{
    (void)vcpu_index;
    (void)udata;
    if (!is_open) {
        is_open = true;
        opened_at = total;
        current = 0;
        segment_at = total;
    }
}

static void on_stop(unsigned int vcpu_index, void *udata)
{
    (void)vcpu_index;
    (void)udata;
    if (is_open) {
        is_open = false;
        window += total - opened_at;
        windows += 1;
        if (segment != NULL) {
            segment[current] += total - segment_at;
        }
    }
}

/* A marked instruction: the same view of `total` as the window markers, so the segments of a
 * window add up to it. Marks outside a window are ignored. */
static void on_mark(unsigned int vcpu_index, void *udata)
{
    (void)vcpu_index;
    if (is_open) {
        segment[current] += total - segment_at;
        current = (uint32_t)(uintptr_t)udata;
        segment_at = total;
    }
}

static int compare_marks(const void *a, const void *b)
{
    uint64_t x = ((const mark_t *)a)->addr, y = ((const mark_t *)b)->addr;
    return x < y ? -1 : x > y;
}

static const mark_t *find_mark(uint64_t pc)
{
    mark_t key = {pc, 0};
    return n_marks ? bsearch(&key, marks, n_marks, sizeof *marks, compare_marks) : NULL;
}

static void on_translate(plugin_id id, struct qemu_plugin_tb *tb)
{
    (void)id;
    size_t n = qemu_plugin_tb_n_insns(tb);
    for (size_t i = 0; i < n; i++) {
        struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, i);
        uint64_t pc = qemu_plugin_insn_vaddr(insn);
        /* Same registration order for both markers keeps their view of `total` consistent. */
        if (pc == start_addr) {
            qemu_plugin_register_vcpu_insn_exec_cb(insn, on_start, CB_NO_REGS, NULL);
        }
        if (pc == stop_addr) {
            qemu_plugin_register_vcpu_insn_exec_cb(insn, on_stop, CB_NO_REGS, NULL);
        }
        const mark_t *m = find_mark(pc);
        if (m != NULL) {
            qemu_plugin_register_vcpu_insn_exec_cb(insn, on_mark, CB_NO_REGS,
                                                   (void *)(uintptr_t)m->id);
        }
        qemu_plugin_register_vcpu_insn_exec_inline(insn, INLINE_ADD_U64, &total, 1);
    }
}

static void on_qemu_exit(plugin_id id, void *udata)
{
    (void)id;
    (void)udata;
    FILE *f = out_path ? fopen(out_path, "w") : stdout;
    if (f == NULL) {
        fprintf(stderr, "icount: cannot write %s\n", out_path);
        return;
    }
    fprintf(f, "total=%" PRIu64 "\nwindow=%" PRIu64 "\nwindows=%" PRIu64 "\nopen=%d\n", total,
            window, windows, is_open ? 1 : 0);
    for (uint32_t id = 0; segment != NULL && id <= max_id; id++) {
        fprintf(f, "segment.%u=%" PRIu64 "\n", id, segment[id]);
    }
    if (f != stdout) {
        fclose(f);
    } else {
        fflush(f);
    }
}

/* ---- arguments ---------------------------------------------------------------------------- */

/* Read `<address> <id>` lines; a repeated address keeps its last id. */
static bool read_marks(const char *path)
{
    FILE *f = fopen(path, "r");
    if (f == NULL) {
        fprintf(stderr, "icount: cannot read marks file %s\n", path);
        return false;
    }
    unsigned long long addr;
    unsigned long id;
    size_t cap = 0;
    while (fscanf(f, "%llx %lu", &addr, &id) == 2) {
        if (id < 1 || id > 65535) {
            fprintf(stderr, "icount: mark id %lu out of range 1..65535\n", id);
            fclose(f);
            return false;
        }
        if (n_marks == cap) {
            cap = cap ? 2 * cap : 64;
            marks = realloc(marks, cap * sizeof *marks);
            if (marks == NULL) {
                fclose(f);
                return false;
            }
        }
        marks[n_marks].addr = (uint64_t)addr & ~(uint64_t)1;
        marks[n_marks].id = (uint32_t)id;
        n_marks++;
        if (id > max_id) {
            max_id = (uint32_t)id;
        }
    }
    bool eof = feof(f);
    fclose(f);
    if (!eof) {
        fprintf(stderr, "icount: bad line in marks file %s\n", path);
        return false;
    }
    /* Stable order for equal addresses is not guaranteed by qsort: keep the last line's id. */
    for (size_t i = 0; i < n_marks; i++) {
        for (size_t j = i + 1; j < n_marks; j++) {
            if (marks[j].addr == marks[i].addr) {
                marks[i].id = marks[j].id;
            }
        }
    }
    qsort(marks, n_marks, sizeof *marks, compare_marks);
    segment = calloc((size_t)max_id + 1, sizeof *segment);
    return segment != NULL;
}

static bool parse_addr(const char *text, uint64_t *value)
{
    char *end = NULL;
    if (*text == '\0') {
        return false;
    }
    unsigned long long v = strtoull(text, &end, 0);
    if (*end != '\0') {
        return false;
    }
    *value = (uint64_t)v & ~(uint64_t)1; /* a Thumb function address has bit 0 set */
    return true;
}

MPQ_EXPORT int qemu_plugin_install(plugin_id id, const struct plugin_info *info, int argc,
                                   char **argv)
{
    if (info != NULL && (info->version.min > 1 || info->version.cur < 1)) {
        fprintf(stderr, "icount: QEMU plugin API %d..%d does not include version 1\n",
                info->version.min, info->version.cur);
        return -1;
    }
    for (int i = 0; i < argc; i++) {
        const char *arg = argv[i];
        if (strncmp(arg, "start=", 6) == 0) {
            if (!parse_addr(arg + 6, &start_addr)) {
                fprintf(stderr, "icount: bad address in '%s'\n", arg);
                return -1;
            }
        } else if (strncmp(arg, "stop=", 5) == 0) {
            if (!parse_addr(arg + 5, &stop_addr)) {
                fprintf(stderr, "icount: bad address in '%s'\n", arg);
                return -1;
            }
        } else if (strncmp(arg, "marks=", 6) == 0 && arg[6] != '\0') {
            if (!read_marks(arg + 6)) {
                return -1;
            }
        } else if (strncmp(arg, "out=", 4) == 0 && arg[4] != '\0') {
            free(out_path);
            out_path = strdup(arg + 4);
        } else {
            fprintf(stderr, "icount: unknown argument '%s' (expected start=, stop=, marks=, out=)\n", arg);
            return -1;
        }
    }
    if ((start_addr == NO_ADDR) != (stop_addr == NO_ADDR)) {
        fprintf(stderr, "icount: give both start= and stop=, or neither\n");
        return -1;
    }
    if (start_addr != NO_ADDR && start_addr == stop_addr) {
        fprintf(stderr, "icount: start and stop are the same address\n");
        return -1;
    }
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_translate);
    qemu_plugin_register_atexit_cb(id, on_qemu_exit, NULL);
    return 0;
}
