/* peers: the client and server ends of `bench conn-rate` and `bench latency`.
 *
 *   peers tcp-server PORT
 *       Non-blocking accept loop (epoll, one thread): reads one request,
 *       answers a fixed 2-byte HTTP/1.1 response with "Connection: close"
 *       and closes, so the server side closes first. Once a second it
 *       prints {"t": SECONDS, "accepted": TOTAL} (monotonic clock), so the
 *       bench sees the rate over time, not only its average.
 *   peers udp-echo PORT
 *       Sends every datagram back to its sender.
 *   peers udp-ping HOST PORT RATE SECONDS FLOWS
 *       Ping-pong: every 1/RATE s (absolute deadlines, so a slow answer
 *       does not shift the schedule) one 32-byte datagram from the next of
 *       FLOWS sockets (each its own source port, i.e. its own flow), then
 *       waits up to 200 ms for the answer; a deadline already past when an
 *       answer comes is not waited for, so with round trips longer than
 *       1/RATE the rate achieved falls to one per round trip (elapsed_s
 *       says). Prints one JSON line: sent, received, lost, elapsed_s and
 *       the round-trip time percentiles in microseconds.
 *
 * Written for the bench lab only: no IPv6, fixed sizes, errors end the
 * process with a message on stderr.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void die(const char *what)
{
    perror(what);
    exit(1);
}

static int bound_socket(int type, int port)
{
    int s = socket(AF_INET, type, 0), one = 1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    if (s < 0)
        die("socket");
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(s, (struct sockaddr *)&a, sizeof a) < 0)
        die("bind");
    return s;
}

static const char RESPONSE[] =
    "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok";

static _Noreturn void tcp_server(int port)
{
    int ls = bound_socket(SOCK_STREAM | SOCK_NONBLOCK, port), ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = ls}, evs[256];
    unsigned long accepted = 0;
    double t0 = now_s(), next = t0 + 1.0;
    char buf[4096];

    if (listen(ls, 4096) < 0)
        die("listen");
    if (ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev) < 0)
        die("epoll");
    printf("ready\n");
    fflush(stdout);
    for (;;) {
        int n = epoll_wait(ep, evs, 256, 100);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == ls) {
                int c;
                while ((c = accept4(ls, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    struct epoll_event ce = {.events = EPOLLIN, .data.fd = c};
                    accepted++;
                    if (epoll_ctl(ep, EPOLL_CTL_ADD, c, &ce) < 0)
                        close(c);
                }
                continue;
            }
            /* One read holds the whole request (wrk's are under 100 bytes);
             * a peer that closed or reset gets closed without an answer. */
            ssize_t got = read(fd, buf, sizeof buf);
            if (got > 0 && write(fd, RESPONSE, sizeof RESPONSE - 1) < 0)
                got = -1;
            if (got != -1 || errno != EAGAIN)
                close(fd);
        }
        double t = now_s();
        if (t >= next) {
            printf("{\"t\": %.3f, \"accepted\": %lu}\n", t - t0, accepted);
            fflush(stdout);
            next += 1.0;
        }
    }
}

static _Noreturn void udp_echo(int port)
{
    int s = bound_socket(SOCK_DGRAM, port);
    char buf[2048];
    printf("ready\n");
    fflush(stdout);
    for (;;) {
        struct sockaddr_in from;
        socklen_t fl = sizeof from;
        ssize_t n = recvfrom(s, buf, sizeof buf, 0, (struct sockaddr *)&from, &fl);
        if (n >= 0)
            sendto(s, buf, n, 0, (struct sockaddr *)&from, fl);
    }
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double pct(const double *v, long n, double p)
{
    long i = (long)(p / 100.0 * (n - 1) + 0.5);
    return n ? v[i < n ? i : n - 1] : -1;
}

static int udp_ping(const char *host, int port, double rate, double seconds, int flows)
{
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons(port)};
    long total = (long)(rate * seconds), sent = 0, got = 0;
    double *rtt = malloc(sizeof(double) * (total ? total : 1));
    int *socks = malloc(sizeof(int) * flows);
    char msg[32], buf[2048];
    struct timespec next;

    if (inet_pton(AF_INET, host, &to.sin_addr) != 1 || !rtt || !socks || flows < 1)
        die("arguments");
    for (int i = 0; i < flows; i++) {
        socks[i] = socket(AF_INET, SOCK_DGRAM, 0);
        if (socks[i] < 0 || connect(socks[i], (struct sockaddr *)&to, sizeof to) < 0)
            die("udp socket");
    }
    long step_ns = (long)(1e9 / rate);
    clock_gettime(CLOCK_MONOTONIC, &next);
    double start = now_s();
    for (; sent < total; sent++) {
        int s = socks[sent % flows];
        memset(msg, 'p', sizeof msg);
        memcpy(msg, &sent, sizeof sent);
        double t0 = now_s();
        if (send(s, msg, sizeof msg, 0) != sizeof msg)
            die("send");
        struct pollfd pfd = {.fd = s, .events = POLLIN};
        /* Answers to an earlier ping that timed out are skipped by number. */
        while (poll(&pfd, 1, 200) == 1) {
            ssize_t n = recv(s, buf, sizeof buf, 0);
            if (n == sizeof msg && !memcmp(buf, msg, sizeof msg)) {
                rtt[got++] = (now_s() - t0) * 1e6;
                break;
            }
        }
        next.tv_nsec += step_ns;
        while (next.tv_nsec >= 1000000000L) {
            next.tv_nsec -= 1000000000L;
            next.tv_sec++;
        }
        clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL);
    }
    double elapsed = now_s() - start;
    qsort(rtt, got, sizeof *rtt, cmp_double);
    double sum = 0;
    for (long i = 0; i < got; i++)
        sum += rtt[i];
    printf("{\"sent\": %ld, \"received\": %ld, \"lost\": %ld, \"elapsed_s\": %.3f, "
           "\"min_us\": %.1f, "
           "\"mean_us\": %.1f, \"p50_us\": %.1f, \"p90_us\": %.1f, \"p99_us\": %.1f, "
           "\"p99_9_us\": %.1f, \"max_us\": %.1f}\n",
           sent, got, sent - got, elapsed, pct(rtt, got, 0), got ? sum / got : -1,
           pct(rtt, got, 50), pct(rtt, got, 90), pct(rtt, got, 99), pct(rtt, got, 99.9),
           pct(rtt, got, 100));
    return 0;
}

int main(int argc, char **argv)
{
    signal(SIGPIPE, SIG_IGN);
    if (argc == 3 && !strcmp(argv[1], "tcp-server"))
        tcp_server(atoi(argv[2]));
    if (argc == 3 && !strcmp(argv[1], "udp-echo"))
        udp_echo(atoi(argv[2]));
    if (argc == 7 && !strcmp(argv[1], "udp-ping"))
        return udp_ping(argv[2], atoi(argv[3]), atof(argv[4]), atof(argv[5]), atoi(argv[6]));
    fprintf(stderr, "usage: peers tcp-server PORT | udp-echo PORT | "
                    "udp-ping HOST PORT RATE SECONDS FLOWS\n");
    return 2;
}
