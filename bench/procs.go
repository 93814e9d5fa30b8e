package main

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"time"
)

// killTimeout bounds the wait for a killed child to be reaped.
const killTimeout = 10 * time.Second

// procs are the long-running children of one benchmark run (redis-server,
// the upstream, Caddy). stopAll kills every one of them; run defers it, and
// main calls run so that it also happens on an error or Ctrl-C.
type procs struct {
	dir string // where each child's log goes
	// pin, when set, pins each child to its CPUs (-pin-redis).
	pin  *pinning
	mu   sync.Mutex
	list []*proc
}

// proc is one started child.
type proc struct {
	name string
	cmd  *exec.Cmd
	log  string        // file with the child's standard output and error
	done chan struct{} // closed when the child has exited
}

// start starts cmd, its output going to <dir>/<name>.log (standard output
// only when cmd has none set), and registers it for stopAll.
func (ps *procs) start(name string, cmd *exec.Cmd) (*proc, error) {
	p := &proc{name: name, cmd: cmd, log: filepath.Join(ps.dir, name+".log"), done: make(chan struct{})}
	f, err := os.Create(p.log)
	if err != nil {
		return nil, err
	}
	if cmd.Stdout == nil {
		cmd.Stdout = f
	}
	cmd.Stderr = f
	cmd.SysProcAttr = sysProcAttr()
	ps.pin.wrap(name, cmd)
	ps.mu.Lock()
	defer ps.mu.Unlock()
	err = cmd.Start()
	_ = f.Close() // the child has its own copy
	if err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	go func() {
		_ = cmd.Wait()
		close(p.done)
	}()
	ps.list = append(ps.list, p)
	return p, nil
}

// exited reports whether the child has exited.
func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// stop kills the child (and its process group) and waits until it is gone.
func (p *proc) stop() error {
	if p.exited() {
		return nil
	}
	killGroup(p.cmd.Process)
	select {
	case <-p.done:
		return nil
	case <-time.After(killTimeout):
		return fmt.Errorf("%s (pid %d) still running %v after SIGKILL", p.name, p.cmd.Process.Pid, killTimeout)
	}
}

// logTail returns the last lines the child wrote.
func (p *proc) logTail() string {
	b, err := os.ReadFile(p.log)
	if err != nil {
		return fmt.Sprintf("(cannot read %s: %v)", p.log, err)
	}
	lines := bytes.Split(bytes.TrimRight(b, "\n"), []byte("\n"))
	if len(lines) > 20 {
		lines = lines[len(lines)-20:]
	}
	return string(bytes.Join(lines, []byte("\n")))
}

// failed wraps err with the tail of the child's log.
func (p *proc) failed(err error) error {
	return fmt.Errorf("%s: %w\n--- %s (tail) ---\n%s", p.name, err, p.log, p.logTail())
}

// stopAll kills every child, the latest started first.
func (ps *procs) stopAll() error {
	ps.mu.Lock()
	defer ps.mu.Unlock()
	var errs []error
	for i := len(ps.list) - 1; i >= 0; i-- {
		errs = append(errs, ps.list[i].stop())
	}
	ps.list = nil
	return errors.Join(errs...)
}
