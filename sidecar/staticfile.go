package sidecar

import (
	"bytes"
	"fmt"
	"os"
	"time"

	"github.com/meshd/meshd/sidecar/config"
)

// staticFilePoll is how often the static catalog file is checked for changes.
var staticFilePoll = time.Second

// staticFileSettle is how long after seeing new content the file is read
// again; the change is applied only when both reads agree, so a file caught
// half-written (truncated, then filled) is never taken as the catalog.
var staticFileSettle = 50 * time.Millisecond

// startStaticFileWatch follows discovery.static_file of the config in force
// (it may change on reload) and replaces the catalog when the file's content
// changes. A file that fails to parse is logged and the last good catalog stays.
//
// The baseline is the content the config in force was built from, not a
// fresh read, so an edit landing between the config load and the first poll
// is still applied. Catalog swaps take s.catalogMu, as Reload does, so a
// poll that read the file under an older config cannot undo a reload.
func (s *Sidecar) startStaticFileWatch(initial *config.Config) {
	s.bg.Add(1)
	go func() {
		defer s.bg.Done()
		base := initial
		last := initial.StaticFileData
		broken := false // the content in last was refused or unreadable; said once
		t := time.NewTicker(staticFilePoll)
		defer t.Stop()
		for {
			select {
			case <-s.ctx.Done():
				return
			case <-t.C:
			}
			cfg := s.cfg.Load()
			if cfg != base {
				// A reload loaded the file (or dropped it) itself.
				base, last, broken = cfg, cfg.StaticFileData, false
			}
			path := cfg.StaticFilePath()
			if path == "" {
				continue
			}
			data, err := os.ReadFile(path)
			if err != nil {
				if !broken {
					s.log.Warn("static catalog file unreadable; keeping the last good catalog", "file", path, "err", err)
					broken = true
				}
				continue
			}
			if bytes.Equal(data, last) {
				continue
			}
			if !s.settled(path, data) {
				continue // still being written; look again next poll
			}
			last = data
			m, err := config.ParseStatic(path, data)
			if err != nil {
				s.log.Error("static catalog file rejected; keeping the last good catalog", "file", path, "err", err)
				broken = true
				continue
			}
			merged := map[string][]config.StaticEntry{}
			for k, v := range cfg.Discovery.Static {
				merged[k] = v
			}
			dup := ""
			for k, v := range m {
				if _, ok := merged[k]; ok {
					dup = k
					break
				}
				merged[k] = v
			}
			if dup != "" {
				// Loading the config refuses this too.
				s.log.Error("static catalog file rejected; keeping the last good catalog", "file", path,
					"err", fmt.Sprintf("service %q is in both discovery.static and the file", dup))
				broken = true
				continue
			}
			broken = false
			s.catalogMu.Lock()
			applied := s.cfg.Load() == cfg
			if applied {
				s.catalog.Replace(staticInstances(merged))
			}
			s.catalogMu.Unlock()
			if applied {
				s.log.Info("static catalog file reloaded", "file", path, "services", len(m))
			}
		}
	}()
}

// settled reports whether path still holds data after staticFileSettle.
func (s *Sidecar) settled(path string, data []byte) bool {
	select {
	case <-s.ctx.Done():
		return false
	case <-time.After(staticFileSettle):
	}
	again, err := os.ReadFile(path)
	return err == nil && bytes.Equal(again, data)
}
