package main

import (
	"context"
	"io"
	"os/exec"
	"slices"
	"testing"
	"time"
)

func TestCPUList(t *testing.T) {
	for _, tc := range []struct {
		in   string
		cpus []int
		out  string
	}{
		{"0", []int{0}, "0"},
		{"0-1", []int{0, 1}, "0-1"},
		{"0-3,6,8-9", []int{0, 1, 2, 3, 6, 8, 9}, "0-3,6,8-9"},
		{"5,1,2", []int{1, 2, 5}, "1-2,5"},
	} {
		cpus, err := parseCPUList(tc.in)
		if err != nil || !slices.Equal(cpus, tc.cpus) {
			t.Errorf("parseCPUList(%q) = %v, %v; want %v", tc.in, cpus, err, tc.cpus)
		}
		if got := formatCPUList(tc.cpus); got != tc.out {
			t.Errorf("formatCPUList(%v) = %q, want %q", tc.cpus, got, tc.out)
		}
	}
	for _, bad := range []string{"", "a", "3-1", "-1", "1-"} {
		if cpus, err := parseCPUList(bad); err == nil {
			t.Errorf("parseCPUList(%q) = %v, want an error", bad, cpus)
		}
	}
	if _, err := newPinning("0"); err == nil {
		t.Error("newPinning with one CPU: want an error, as Redis would have the only CPU")
	}
}

// TestPinRedis starts a redis-server and another child as -pin-redis does
// and reads from the kernel where each may run: Redis on the first CPU of
// this process' own, the other child on the rest.
func TestPinRedis(t *testing.T) {
	o, err := parseFlags([]string{"-pin-redis"}, io.Discard)
	if err != nil || !o.pinRedis {
		t.Fatalf("parseFlags(-pin-redis) = %+v, %v", o, err)
	}
	allowed, err := cpusAllowed(0)
	if err != nil {
		t.Fatal(err)
	}
	cpus, err := parseCPUList(allowed)
	if err != nil {
		t.Fatal(err)
	}
	pin, err := newPinning(allowed)
	if err != nil {
		t.Fatalf("%v (this test needs 2 CPUs, as the benchmark does)", err)
	}
	ps := &procs{dir: t.TempDir(), pin: pin}
	t.Cleanup(func() {
		if err := ps.stopAll(); err != nil {
			t.Error(err)
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	redisProc, _, err := startRedis(ctx, ps, "redis")
	if err != nil {
		t.Fatal(err)
	}
	other, err := ps.start("upstream", exec.Command("sleep", "60"))
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		p    *proc
		want string
	}{
		{redisProc, formatCPUList(cpus[:1])},
		{other, formatCPUList(cpus[1:])},
	} {
		// taskset sets the affinity before it execs the program: once the
		// pid runs the program, its affinity is final.
		var got string
		deadline := time.Now().Add(10 * time.Second)
		for {
			got, err = pin.check(c.p.name, c.p.cmd.Process.Pid)
			if err == nil || time.Now().After(deadline) {
				break
			}
			time.Sleep(pollInterval)
		}
		if err != nil || got != c.want {
			t.Errorf("%s: Cpus_allowed_list %q (%v), want %q of this process' %s", c.p.name, got, err, c.want, allowed)
		}
	}
}
