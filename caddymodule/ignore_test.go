package caddymodule

import (
	"os"
	"slices"
	"strings"
	"testing"
)

// TestIgnoredBinaries: every binary a command of the README's Build section
// writes (go build -o, xcaddy --output) is kept out of git and out of the
// image's build context.
func TestIgnoredBinaries(t *testing.T) {
	var built []string
	for line := range strings.Lines(readmeBlock(t, "../README.md", "## Build", "sh")) {
		f := strings.Fields(line)
		for i := 0; i+1 < len(f); i++ {
			if f[i] == "-o" || f[i] == "--output" {
				built = append(built, "/"+f[i+1])
			}
		}
	}
	if len(built) < 2 {
		t.Fatalf("the Build section writes %v: want the go build and the xcaddy binaries", built)
	}
	for _, file := range []string{"../.gitignore", "../.dockerignore"} {
		data, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		lines := strings.Split(string(data), "\n")
		for _, b := range built {
			if !slices.Contains(lines, b) {
				t.Errorf("%s does not keep out %s, which the Build section writes", file, b)
			}
		}
	}
}
