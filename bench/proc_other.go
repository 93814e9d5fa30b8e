//go:build !linux

package main

import (
	"errors"
	"os"
	"syscall"
	"time"
)

func sysProcAttr() *syscall.SysProcAttr { return nil }

func killGroup(p *os.Process) { _ = p.Kill() }

// raiseFileLimit leaves the limit alone outside Linux; the 2,000-connection
// scenario may then run out of file descriptors. Zero means unchanged.
func raiseFileLimit(uint64) (uint64, error) { return 0, nil }

// cpuTime is known on Linux only.
func cpuTime(int) (time.Duration, bool) { return 0, false }

// cpusAllowed is known on Linux only: -pin-redis needs it.
func cpusAllowed(int) (string, error) { return "", errors.New("-pin-redis needs Linux") }
