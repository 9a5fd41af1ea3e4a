/*
 * The pod sandbox ("pause") process for local clusters that cannot pull registry.k8s.io/pause: it holds the pod's
 * namespaces, reaps orphaned children (it is PID 1 when the pod shares its PID namespace) and exits on SIGINT or
 * SIGTERM. The same job as Kubernetes' build/pause/linux/pause.c, written for tests/cluster/images.py, which links
 * it statically (gcc -static) and packs the binary alone into localhost/pause:<version>.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

static void on_stop(int signum) {
    (void)signum;
    _exit(0);
}

static void on_child(int signum) {
    (void)signum;
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "-v") == 0) {
        printf("pause (telechat-operator local build)\n");
        return 0;
    }
    if (getpid() != 1) {
        fprintf(stderr, "pause: warning: not running as PID 1, orphans are not reaped here\n");
    }
    struct sigaction stop = {.sa_handler = on_stop};
    struct sigaction child = {.sa_handler = on_child, .sa_flags = SA_NOCLDSTOP};
    if (sigaction(SIGINT, &stop, NULL) < 0 || sigaction(SIGTERM, &stop, NULL) < 0 ||
        sigaction(SIGCHLD, &child, NULL) < 0) {
        perror("pause: sigaction");
        return 1;
    }
    for (;;) {
        pause();
    }
}
