// peak_rss FILE COMMAND [ARG...]: runs COMMAND and writes its peak resident memory (KiB) to FILE; exits
// with its status. The command is forked from this small process, so its peak is its own: a process
// forked from a large one (the test suite under ASan) starts from that one's resident memory, which
// Linux keeps in the peak across exec.
#include <cstdio>

#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char** argv) {
    if (argc < 3) {
        std::fprintf(stderr, "usage: peak_rss FILE COMMAND [ARG...]\n");
        return 2;
    }
    const pid_t pid = fork();
    if (pid < 0) return 127;
    if (pid == 0) {
        execvp(argv[2], argv + 2);
        _exit(127);
    }
    int status = 0;
    rusage usage{};
    if (wait4(pid, &status, 0, &usage) != pid) return 127;
    FILE* out = std::fopen(argv[1], "w");
    if (out == nullptr) return 127;
    std::fprintf(out, "%ld\n", usage.ru_maxrss);
    std::fclose(out);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128;
}
