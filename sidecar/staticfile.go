package sidecar

import (
	"bytes"
	"os"
	"time"

	"github.com/meshd/meshd/sidecar/config"
)

// staticFilePoll is how often the static catalog file is checked for changes.
var staticFilePoll = time.Second

// startStaticFileWatch follows discovery.static_file of the config in force
// (it may change on reload) and replaces the catalog when the file's content
// changes. A file that fails to parse is logged and the last good catalog stays.
func (s *Sidecar) startStaticFileWatch(initial *config.Config) {
	s.bg.Add(1)
	go func() {
		defer s.bg.Done()
		lastPath := initial.StaticFilePath()
		var last []byte
		if lastPath != "" {
			last, _ = os.ReadFile(lastPath)
		}
		t := time.NewTicker(staticFilePoll)
		defer t.Stop()
		for {
			select {
			case <-s.ctx.Done():
				return
			case <-t.C:
			}
			cfg := s.cfg.Load()
			path := cfg.StaticFilePath()
			if path == "" {
				lastPath, last = "", nil
				continue
			}
			data, err := os.ReadFile(path)
			if err != nil {
				if lastPath == path && last != nil {
					s.log.Warn("static catalog file unreadable; keeping the last good catalog", "file", path, "err", err)
					last = nil
				}
				continue
			}
			if path == lastPath && bytes.Equal(data, last) {
				continue
			}
			if path != lastPath {
				// A reload switched files and loaded it already.
				lastPath, last = path, data
				continue
			}
			lastPath, last = path, data
			m, err := config.ParseStatic(path, data)
			if err != nil {
				s.log.Error("static catalog file rejected; keeping the last good catalog", "file", path, "err", err)
				continue
			}
			merged := map[string][]config.StaticEntry{}
			for k, v := range cfg.Discovery.Static {
				merged[k] = v
			}
			for k, v := range m {
				if _, dup := merged[k]; !dup {
					merged[k] = v
				}
			}
			s.catalog.Replace(staticInstances(merged))
			s.log.Info("static catalog file reloaded", "file", path, "services", len(m))
		}
	}()
}
