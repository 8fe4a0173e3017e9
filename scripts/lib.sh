# What the build scripts share; sourced by them (`source scripts/lib.sh`), not run.
# shellcheck shell=bash

# New build directories are configured for Ninja, under which the test programs' sources compile
# while moe-run links (an existing directory keeps the generator it was configured with).
export CMAKE_GENERATOR=${CMAKE_GENERATOR:-Ninja}

# Runs a test program, typically under MOE_ISA=<family>, and returns its status where that is 0 or 77
# (skipped: the family is not on this CPU); any other status stops the calling script with it.
# With --quiet the program's output is hidden, and on a failure it runs again to show its last lines.
# usage: family_run [--quiet] PROGRAM [ARGUMENTS...]
family_run() {
  local quiet=no status=0
  if [[ $1 == --quiet ]]; then quiet=yes; shift; fi
  if [[ $quiet == yes ]]; then "$@" >/dev/null || status=$?; else "$@" || status=$?; fi
  ((status == 0 || status == 77)) && return "$status"
  if [[ $quiet == yes ]]; then "$@" | tail -40 || :; fi
  exit "$status"
}
