//go:build linux

package redistest

import (
	"os"
	"syscall"
)

// sysProcAttr puts the server in its own process group, so that killProcess
// also reaches the children it forks (AOF rewrite, replica sync), and has
// the kernel kill it if the test binary dies without running cleanups.
func sysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
}

func killProcess(p *os.Process) {
	if syscall.Kill(-p.Pid, syscall.SIGKILL) != nil {
		_ = p.Kill()
	}
}
