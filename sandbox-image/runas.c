/*
 * runas: exec a program as another (non-root) user, with no capabilities at all.
 *
 *     runas UID GID PROGRAM [ARG...]
 *
 * Drops the supplementary groups, sets the real, effective and saved gid and uid, clears the
 * ambient capability set and then the inheritable, permitted and effective sets, and execs
 * PROGRAM (an absolute path: no PATH search) with the environment it was given. Any failure
 * before the exec is fatal (exit status 126; 127 when PROGRAM does not exist), so a process
 * never runs with more than it should.
 *
 * The sandbox agent (uid `agent`, with CAP_SETUID, CAP_SETGID and CAP_KILL as ambient
 * capabilities) starts every user process through it. A uid change between two non-root uids
 * keeps capabilities, which is why they are cleared explicitly. It does what
 * `setpriv --reuid=UID --regid=GID --clear-groups --inh-caps=-all --ambient-caps=-all --`
 * does, as a small static binary: its exec costs a fraction of setpriv's (no dynamic loader,
 * no libcap-ng, no locale), and every command pays it.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <grp.h>
#include <linux/capability.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

static void fail(const char *what)
{
    fprintf(stderr, "runas: %s: %s\n", what, strerror(errno));
    exit(126);
}

/* A uid or gid: decimal, not 0 (never root), not -1. */
static unsigned long id_from(const char *text)
{
    char *end;
    errno = 0;
    unsigned long value = strtoul(text, &end, 10);
    if (errno != 0 || *text == '\0' || *end != '\0' || value == 0 || value >= 0xffffffffUL) {
        fprintf(stderr, "runas: not a usable id: %s\n", text);
        exit(126);
    }
    return value;
}

int main(int argc, char **argv)
{
    if (argc < 4 || argv[3][0] != '/') {
        fputs("usage: runas UID GID /PATH/TO/PROGRAM [ARG...]\n", stderr);
        return 126;
    }
    uid_t uid = (uid_t)id_from(argv[1]);
    gid_t gid = (gid_t)id_from(argv[2]);

    if (setgroups(0, NULL) != 0)
        fail("setgroups");
    if (setresgid(gid, gid, gid) != 0)
        fail("setresgid");
    if (setresuid(uid, uid, uid) != 0)
        fail("setresuid");
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0)
        fail("clearing the ambient capabilities");
    struct __user_cap_header_struct header = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3];
    memset(data, 0, sizeof data);
    if (syscall(SYS_capset, &header, data) != 0)
        fail("clearing the capabilities");

    execv(argv[3], argv + 3);
    int error = errno;
    fprintf(stderr, "runas: %s: %s\n", argv[3], strerror(error));
    return error == ENOENT ? 127 : 126;
}
