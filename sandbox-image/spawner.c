/*
 * spawner: starts the agent's user processes without an exec'd wrapper per command.
 *
 *     spawner AGENT_PID          (fd 0: the agent's end of a socketpair; see agent/spawner.py)
 *
 * The agent starts it once, through runas, as `sandbox` with no capability; from then on it
 * only forks. For each request on fd 0 (a stream socket) it receives
 *
 *     u32 length, u32 argc, u32 envc      (native byte order), with 5 fds by SCM_RIGHTS:
 *                                         stdin, stdout, stderr, go (read), status (write)
 *     length bytes: cwd NUL argv[0] NUL ... argv[argc-1] NUL env[0] NUL ... env[envc-1] NUL
 *
 * and creates the process with clone(CLONE_PARENT | SIGCHLD): the new process is the AGENT's
 * child (not the spawner's), so the agent waits for it, sees its exit status and signals it
 * as before. It answers at once with  i32 pid, i32 errno  (pid > 0, errno 0; or pid 0 and the
 * errno of the failed clone).
 *
 * The new process first closes its copy of the spawner's socket and waits for one byte on the
 * go pipe, which the agent writes only once it has the pid and has checked that it is its own
 * child. If the go pipe reaches end of file instead (the agent gave up on this spawner: it
 * died, hung or answered nonsense), the process exits with status 125 without running
 * anything, so the agent may retry the command without it running twice. Then it calls
 * setsid, puts the three fds on 0, 1, 2, changes to cwd and execs argv[0] (an absolute path:
 * no PATH search) with exactly env. If chdir or exec fails it writes  i32 stage (1 chdir,
 * 2 exec), i32 errno  on the status pipe (close-on-exec: end of file there means the exec
 * happened) and exits with status 127.
 *
 * A malformed request ends the spawner (status 1); so does end of file on fd 0 (the agent is
 * gone), and the death of the agent (PR_SET_PDEATHSIG): it never outlives the agent, so its
 * CLONE_PARENT children cannot end up with another parent. Signal dispositions and the
 * signal mask are left as they were inherited (as the exec'd wrapper left them).
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
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#define CHANNEL 0
#define NFDS 5
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

static void child_fail(int status_fd, int32_t stage)
{
    int32_t report[2] = {stage, errno};
    ssize_t ignored = write(status_fd, report, sizeof report);
    (void)ignored;
    _exit(127);
}

static void child(int fds[NFDS], char *cwd, char **argv, char **envp)
{
    close(CHANNEL);
    char go;
    ssize_t n;
    do
        n = read(fds[3], &go, 1);
    while (n < 0 && errno == EINTR);
    if (n != 1)
        _exit(125);
    if (setsid() < 0)
        child_fail(fds[4], STAGE_EXEC);
    for (int i = 0; i < 3; i++)
        if (dup2(fds[i], i) < 0)
            child_fail(fds[4], STAGE_EXEC);
    if (chdir(cwd) != 0)
        child_fail(fds[4], STAGE_CHDIR);
    execve(argv[0], argv, envp);
    child_fail(fds[4], STAGE_EXEC);
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

int main(int argc, char **argv)
{
    if (argc != 2)
        return 2;
    pid_t agent = (pid_t)strtol(argv[1], NULL, 10);
    if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) != 0 || getppid() != agent)
        return 1;
    /* Nothing but the channel and stdout/stderr stays open (whatever else was inherited must
     * not reach user processes); the channel must not reach them either (the child also
     * closes it before it waits). */
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
        long pid = syscall(SYS_clone, (unsigned long)(CLONE_PARENT | SIGCHLD), 0UL, 0UL, 0UL,
                           0UL);
        if (pid == 0)
            child(fds, cwd, vec, vec + head[1] + 1);
        int error = pid < 0 ? errno : 0;
        for (int i = 0; i < NFDS; i++)
            close(fds[i]);
        free(vec);
        free(buf);
        reply(pid < 0 ? 0 : (int32_t)pid, error);
    }
}
