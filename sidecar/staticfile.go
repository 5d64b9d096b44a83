package sidecar

import (
	"bytes"
	"time"

	"github.com/meshd/meshd/sidecar/config"
)

// staticFilePoll is how often the static catalog file is checked for changes.
var staticFilePoll = time.Second

// staticFileSettle is how long after seeing new content the file is read
// again; the change is applied only when both reads agree, so a file caught
// while a quick writer fills it is not taken as the catalog. (A slower
// in-place writer can still be caught; renaming a finished file into place
// is the safe way to edit.)
var staticFileSettle = 50 * time.Millisecond

// Test hooks, nil in production: staticFileSettling runs when new content
// is about to be settled, staticFilePolled after each poll.
var staticFileSettling, staticFilePolled func()

// startStaticFileWatch follows discovery.static_file of the config in force
// (it may change on reload) and replaces the catalog when the file's content
// changes. Content is checked as loading the config checks it (it must
// parse, must not repeat a service of discovery.static, and must leave every
// static upstream an instance); refused content is logged once and the last
// good catalog stays.
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
		unreadable := false
		t := time.NewTicker(staticFilePoll)
		defer t.Stop()
		for {
			select {
			case <-s.ctx.Done():
				return
			case <-t.C:
			}
			s.pollStaticFile(&base, &last, &unreadable)
			if staticFilePolled != nil {
				staticFilePolled()
			}
		}
	}()
}

// pollStaticFile is one look at the catalog file; base, last and
// unreadable are the watcher's state (the config last seen, the content
// last considered, whether the file was unreadable).
func (s *Sidecar) pollStaticFile(base **config.Config, last *[]byte, unreadable *bool) {
	cfg := s.cfg.Load()
	if cfg != *base {
		// A reload loaded the file (or dropped it) itself.
		*base, *last, *unreadable = cfg, cfg.StaticFileData, false
	}
	path := cfg.StaticFilePath()
	if path == "" {
		return
	}
	data, err := config.ReadStaticFile(path)
	if err != nil {
		if !*unreadable {
			s.log.Warn("static catalog file unreadable; keeping the last good catalog", "file", path, "err", err)
			*unreadable = true
		}
		return
	}
	if *unreadable {
		s.log.Info("static catalog file readable again", "file", path)
		*unreadable = false
	}
	if bytes.Equal(data, *last) {
		return
	}
	if staticFileSettling != nil {
		staticFileSettling()
	}
	if !s.settled(path, data) {
		return // still being written; look again next poll
	}
	*last = data
	merged, err := cfg.StaticWithFile(data)
	if err != nil {
		s.log.Error("static catalog file rejected; keeping the last good catalog", "file", path, "err", err)
		return
	}
	s.catalogMu.Lock()
	applied := s.cfg.Load() == cfg
	if applied {
		s.catalog.Replace(staticInstances(merged))
	}
	s.catalogMu.Unlock()
	if applied {
		s.log.Info("static catalog file reloaded", "file", path, "services", len(merged))
	}
}

// settled reports whether path still holds data after staticFileSettle.
func (s *Sidecar) settled(path string, data []byte) bool {
	select {
	case <-s.ctx.Done():
		return false
	case <-time.After(staticFileSettle):
	}
	again, err := config.ReadStaticFile(path)
	return err == nil && bytes.Equal(again, data)
}
