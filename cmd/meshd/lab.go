package main

import (
	"fmt"
	"io"
)

// cmdLab is replaced by the algorithm lab.
func cmdLab(args []string, stdout, stderr io.Writer) int {
	fmt.Fprintln(stderr, "meshd lab: not available in this build")
	return 1
}
