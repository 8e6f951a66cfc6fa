/*
 * spawner: starts the agent's user processes without an exec'd wrapper per command.
 *
 *     spawner AGENT_PID          (fd 0: the agent's end of a socketpair; see agent/spawner.py)
 *
 * The agent starts it once, through runas, as `sandbox` with no capability, with stdout and
 * stderr on /dev/null; from then on it only creates processes. For each request on fd 0 (a stream socket) it receives
 *
 *     u32 length, u32 argc, u32 envc      (native byte order), with 4 fds by SCM_RIGHTS:
 *                                         stdin, stdout, stderr, status (a pipe's write end)
 *     length bytes: cwd NUL argv[0] NUL ... argv[argc-1] NUL env[0] NUL ... env[envc-1] NUL
 *
 * and creates the process the way posix_spawn does (clone with CLONE_VM | CLONE_VFORK, on a
 * stack of its own: no copy of the address space, and the spawner waits until the process has
 * exec'd or failed), plus CLONE_PARENT: the new process is the AGENT's child, not the
 * spawner's, so the agent waits for it, sees its exit status and signals it as before. Then it
 * answers  i32 pid, i32 errno  (pid > 0 and 0; or 0 and the errno of the failed clone).
 *
 * The new process first writes its pid (i32) on the status pipe, then calls setsid, puts the
 * three fds on 0, 1, 2 (when fd 0 is a terminal, a PTY's slave, it becomes the new session's
 * controlling terminal: TIOCSCTTY), changes to cwd and execs argv[0] (an absolute path: no PATH search)
 * with exactly env; if chdir or exec fails it writes  i32 stage (1 chdir, 2 exec), i32 errno
 * there too and exits with status 127. The status pipe is close-on-exec. The pid record is
 * what lets the agent recover from a spawner that dies or hangs in the middle of a request:
 * a process that was created announced itself there (the agent adopts it, it is not started
 * twice), and one that cannot write it (the agent closed the pipe, having given up) exits
 * with status 125 without running anything.
 *
 * A malformed request ends the spawner (status 1); so does end of file on fd 0 (the agent is
 * gone), and the death of the agent (PR_SET_PDEATHSIG): it never outlives the agent, so its
 * CLONE_PARENT children cannot end up with another parent. Signal dispositions and the
 * signal mask are left as they were inherited (as the exec'd wrapper left them); every other
 * inherited fd is closed at its start.
 *
 * It holds nothing user code could not have: it runs as the same uid as user code, with no
 * capability, no secret in its environment (the agent starts it with an empty one) and only
 * the fds of the commands it is starting. User code can kill, stop or ptrace it; the agent
 * never waits on it without a deadline and starts a new one (see SECURITY.md).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#define CHANNEL 0
#define NFDS 4
#define STACK_SIZE (256 * 1024)
#define MAX_REQUEST (16u << 20)
#define STAGE_CHDIR 1
#define STAGE_EXEC 2

/* Reads exactly n bytes from the channel; the first read may carry fds (left in *fds, up to
 * NFDS, -1 for missing). Returns 0, or -1 on end of file / error / wrong number of fds. */
static int read_request_head(uint32_t head[3], int fds[NFDS])
{
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(sizeof(int) * NFDS)];
    } control;
    size_t got = 0;
    int nfds = 0;
    for (int i = 0; i < NFDS; i++)
        fds[i] = -1;
    while (got < sizeof(uint32_t) * 3) {
        struct iovec iov = {(char *)head + got, sizeof(uint32_t) * 3 - got};
        struct msghdr msg = {0};
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.buf;
        msg.msg_controllen = sizeof control.buf;
        ssize_t n = recvmsg(CHANNEL, &msg, MSG_CMSG_CLOEXEC);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        if (msg.msg_flags & MSG_CTRUNC)
            return -1;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
            if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
                continue;
            size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            int *incoming = (int *)CMSG_DATA(c);
            for (size_t i = 0; i < count; i++) {
                if (nfds < NFDS)
                    fds[nfds++] = incoming[i];
                else
                    close(incoming[i]);
            }
        }
        got += (size_t)n;
    }
    return nfds == NFDS ? 0 : -1;
}

static int read_exactly(char *buf, size_t size)
{
    size_t got = 0;
    while (got < size) {
        ssize_t n = read(CHANNEL, buf + got, size - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        got += (size_t)n;
    }
    return 0;
}

static void reply(int32_t pid, int32_t error)
{
    int32_t answer[2] = {pid, error};
    size_t sent = 0;
    while (sent < sizeof answer) {
        ssize_t n = send(CHANNEL, (char *)answer + sent, sizeof answer - sent, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            _exit(0); /* the agent is gone */
        sent += (size_t)n;
    }
}

/* Splits the payload into cwd, argv and envp (NULL-terminated, pointing into buf). */
static char **split(char *buf, uint32_t length, uint32_t argc, uint32_t envc, char **cwd)
{
    if (length == 0 || buf[length - 1] != '\0' || argc == 0 || argc > length || envc > length)
        return NULL;
    char **vec = calloc((size_t)argc + envc + 2, sizeof(char *));
    if (vec == NULL)
        return NULL;
    char *p = buf, *end = buf + length;
    *cwd = p;
    p += strlen(p) + 1;
    for (uint32_t i = 0; i < argc + envc; i++) {
        if (p >= end) {
            free(vec);
            return NULL;
        }
        /* argv ends with a NULL, then envp starts */
        vec[i < argc ? i : i + 1] = p;
        p += strlen(p) + 1;
    }
    if (p != end || vec[0][0] != '/') {
        free(vec);
        return NULL;
    }
    return vec;
}

struct job {
    int fds[NFDS];
    char *cwd;
    char **argv;
    char **envp;
};

static void child_fail(int status_fd, int32_t stage)
{
    int32_t report[2] = {stage, errno};
    ssize_t ignored = write(status_fd, report, sizeof report);
    (void)ignored;
    _exit(127);
}

/* Runs in the new process, on its own stack, in the spawner's memory (which is suspended
 * until the exec): only system calls, no allocation. */
static int child(void *arg)
{
    struct job *job = arg;
    int32_t pid = (int32_t)getpid();
    if (write(job->fds[3], &pid, sizeof pid) != (ssize_t)sizeof pid)
        _exit(125); /* the agent gave up on this request: run nothing */
    if (setsid() < 0)
        child_fail(job->fds[3], STAGE_EXEC);
    for (int i = 0; i < 3; i++)
        if (dup2(job->fds[i], i) < 0)
            child_fail(job->fds[3], STAGE_EXEC);
    if (isatty(0) && ioctl(0, TIOCSCTTY, 0) != 0)
        child_fail(job->fds[3], STAGE_EXEC);
    if (chdir(job->cwd) != 0)
        child_fail(job->fds[3], STAGE_CHDIR);
    execve(job->argv[0], job->argv, job->envp);
    child_fail(job->fds[3], STAGE_EXEC);
    return 127;
}

static void close_from(int first)
{
#ifdef SYS_close_range
    if (syscall(SYS_close_range, (unsigned)first, ~0U, 0U) == 0)
        return;
#endif
    long max = sysconf(_SC_OPEN_MAX);
    for (long fd = first; fd < (max > 0 ? max : 1024); fd++)
        close((int)fd);
}

static char stack[STACK_SIZE] __attribute__((aligned(16)));

int main(int argc, char **argv)
{
    if (argc != 2)
        return 2;
    pid_t agent = (pid_t)strtol(argv[1], NULL, 10);
    if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) != 0 || getppid() != agent)
        return 1;
    /* Nothing but the channel and stdout/stderr (/dev/null) stays open: whatever else was
     * inherited must not reach user processes, and neither must the channel (close-on-exec). */
    close_from(3);
    if (fcntl(CHANNEL, F_SETFD, FD_CLOEXEC) != 0)
        return 1;
    for (;;) {
        uint32_t head[3];
        int fds[NFDS];
        if (read_request_head(head, fds) != 0)
            return 1;
        uint32_t length = head[0];
        if (length == 0 || length > MAX_REQUEST)
            return 1;
        char *buf = malloc(length);
        if (buf == NULL || read_exactly(buf, length) != 0)
            return 1;
        char *cwd = NULL;
        char **vec = split(buf, length, head[1], head[2], &cwd);
        if (vec == NULL)
            return 1;
        struct job job = {{fds[0], fds[1], fds[2], fds[3]}, cwd, vec, vec + head[1] + 1};
        int pid = clone(child, stack + STACK_SIZE, CLONE_VM | CLONE_VFORK | CLONE_PARENT | SIGCHLD,
                        &job);
        int error = pid < 0 ? errno : 0;
        for (int i = 0; i < NFDS; i++)
            close(fds[i]);
        free(vec);
        free(buf);
        reply(pid < 0 ? 0 : (int32_t)pid, error);
    }
}
