// Package buildinfo holds the version stamped into the meshd binary at build time.
package buildinfo

import (
	"runtime"
	"runtime/debug"
)

// Version and Commit are set with -ldflags -X by the Makefile.
var (
	Version = "dev"
	Commit  = ""
)

// String describes the build: version, commit and Go version.
func String() string {
	commit := Commit
	if commit == "" {
		if bi, ok := debug.ReadBuildInfo(); ok {
			for _, s := range bi.Settings {
				if s.Key == "vcs.revision" && len(s.Value) >= 7 {
					commit = s.Value[:7]
				}
			}
		}
	}
	if commit == "" {
		commit = "unknown"
	}
	return "meshd " + Version + " (commit " + commit + ", " + runtime.Version() + ")"
}
