package main

import (
	"errors"
	"fmt"
	"os/exec"
	"slices"
	"strconv"
	"strings"
)

// pinning puts redis-server on a CPU of its own and every other process of
// the run (the upstream, Caddy, wrk) on the rest, as production runs Redis
// on cores the gateway does not use. Each child is started under taskset,
// which sets the affinity before it execs the program, so that every thread
// the program starts inherits it.
type pinning struct {
	taskset string
	redis   []int // the CPU redis-server runs on
	rest    []int // the CPUs of everything else
}

// newPinning splits the CPUs this process may run on (allowed, as
// /proc/self/status' Cpus_allowed_list gives them): the first for Redis,
// the others for the rest.
func newPinning(allowed string) (*pinning, error) {
	cpus, err := parseCPUList(allowed)
	if err != nil {
		return nil, fmt.Errorf("-pin-redis: this process' CPUs %q: %w", allowed, err)
	}
	if len(cpus) < 2 {
		return nil, fmt.Errorf("-pin-redis: needs at least 2 CPUs to run on, this process has %d (%s)", len(cpus), allowed)
	}
	bin, err := exec.LookPath("taskset")
	if err != nil {
		return nil, fmt.Errorf("-pin-redis: taskset not found on PATH (%v): install it, e.g. apt-get install -y util-linux", err)
	}
	return &pinning{taskset: bin, redis: cpus[:1], rest: cpus[1:]}, nil
}

// cpus returns the CPUs of the child called name: a redis-server's are
// Redis' own.
func (p *pinning) cpus(name string) []int {
	if strings.HasPrefix(name, "redis") {
		return p.redis
	}
	return p.rest
}

// wrap makes cmd run under taskset on the CPUs of the child called name.
// The child keeps its pid: taskset execs the program.
func (p *pinning) wrap(name string, cmd *exec.Cmd) {
	if p == nil {
		return
	}
	cmd.Args = append([]string{"taskset", "-c", formatCPUList(p.cpus(name)), cmd.Path}, cmd.Args[1:]...)
	cmd.Path = p.taskset
}

// check reads the CPUs child name (pid) may run on from the kernel and
// compares them with those it was given.
func (p *pinning) check(name string, pid int) (string, error) {
	got, err := cpusAllowed(pid)
	if err != nil {
		return "", fmt.Errorf("-pin-redis: %s (pid %d): %w", name, pid, err)
	}
	want := formatCPUList(p.cpus(name))
	if got != want {
		return got, fmt.Errorf("-pin-redis: %s (pid %d) may run on CPUs %s, want %s", name, pid, got, want)
	}
	return got, nil
}

// parseCPUList reads a CPU list such as 0-3,6,8-9 (the kernel's list
// format, as in Cpus_allowed_list) into sorted CPU numbers.
func parseCPUList(s string) ([]int, error) {
	var cpus []int
	for part := range strings.SplitSeq(strings.TrimSpace(s), ",") {
		lo, hi, isRange := strings.Cut(part, "-")
		a, err := strconv.Atoi(lo)
		if err != nil || a < 0 {
			return nil, fmt.Errorf("%q is not a CPU number", lo)
		}
		b := a
		if isRange {
			if b, err = strconv.Atoi(hi); err != nil || b < a {
				return nil, fmt.Errorf("%q is not a CPU range", part)
			}
		}
		for c := a; c <= b; c++ {
			cpus = append(cpus, c)
		}
	}
	if len(cpus) == 0 {
		return nil, errors.New("no CPU")
	}
	slices.Sort(cpus)
	return slices.Compact(cpus), nil
}

// formatCPUList writes sorted CPU numbers in the kernel's list format:
// runs of two or more as a range.
func formatCPUList(cpus []int) string {
	var parts []string
	for i := 0; i < len(cpus); {
		j := i
		for j+1 < len(cpus) && cpus[j+1] == cpus[j]+1 {
			j++
		}
		if j > i {
			parts = append(parts, fmt.Sprintf("%d-%d", cpus[i], cpus[j]))
		} else {
			parts = append(parts, strconv.Itoa(cpus[i]))
		}
		i = j + 1
	}
	return strings.Join(parts, ",")
}
