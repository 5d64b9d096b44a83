// Command meshd is a service-mesh sidecar: it takes an app's outbound HTTP
// calls on localhost, finds the upstream's instances (static catalog or
// Consul), picks one with the configured balancing algorithm and forwards the
// call with circuit breaking, retries, timeouts, traces and metrics.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"reflect"
	"syscall"
	"time"

	"github.com/meshd/meshd/cmd/meshd/internal/buildinfo"
	"github.com/meshd/meshd/sidecar"
	"github.com/meshd/meshd/sidecar/config"
	"github.com/meshd/meshd/telemetry"
)

const usage = `meshd: a client-side load-balancing sidecar.

Usage:
  meshd run --config FILE        start the sidecar
  meshd validate --config FILE   check a config file and print every problem
  meshd lab [flags]              compare balancing algorithms on local backends
  meshd version                  print version, commit and Go version
  meshd help [COMMAND]           show help

Run 'meshd COMMAND --help' for the flags of a command.
`

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	switch args[0] {
	case "run":
		return cmdRun(args[1:], stdout, stderr)
	case "validate":
		return cmdValidate(args[1:], stdout, stderr)
	case "lab":
		return cmdLab(args[1:], stdout, stderr)
	case "version", "--version", "-version":
		fmt.Fprintln(stdout, buildinfo.String())
		return 0
	case "help", "-h", "--help", "-help":
		if len(args) > 1 {
			return run([]string{args[1], "--help"}, stdout, stderr)
		}
		fmt.Fprint(stdout, usage)
		return 0
	default:
		fmt.Fprintf(stderr, "meshd: unknown command %q\n\n%s", args[0], usage)
		return 2
	}
}

func newFlags(name, synopsis string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("meshd "+name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: meshd %s\n\n", synopsis)
		fs.PrintDefaults()
	}
	return fs
}

// parseFlags returns an exit code and false when the command should stop.
func parseFlags(fs *flag.FlagSet, args []string, stdout io.Writer) (int, bool) {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fs.SetOutput(stdout)
			fs.Usage()
			return 0, false
		}
		return 2, false
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(fs.Output(), "meshd: unexpected argument %q\n", fs.Arg(0))
		fs.Usage()
		return 2, false
	}
	return 0, true
}

func cmdValidate(args []string, stdout, stderr io.Writer) int {
	fs := newFlags("validate", "validate --config FILE\n\nChecks the file (and its static catalog file) and prints every problem, one per line,\nas FILE:LINE: KEY: PROBLEM. Exits 1 when there is any.", stderr)
	file := fs.String("config", "meshd.yaml", "config file to check")
	if code, ok := parseFlags(fs, args, stdout); !ok {
		return code
	}
	cfg, err := config.Load(*file)
	if err != nil {
		var es config.Errors
		if errors.As(err, &es) {
			for _, e := range es {
				fmt.Fprintln(stderr, e.Error())
			}
			fmt.Fprintf(stderr, "%d problem(s) in %s\n", len(es), *file)
		} else {
			fmt.Fprintln(stderr, err)
		}
		return 1
	}
	fmt.Fprintf(stdout, "%s: ok (%d upstreams)\n", *file, len(cfg.Upstreams))
	return 0
}

// reloadable checks next, read again for a reload, against the running
// config (running, started from a file whose log section was fileLog) and
// prepares it: the log's format and level and the telemetry are set up once
// at start, so a change to them is refused rather than reported reloaded
// and ignored; log.access applies at once. next.Log becomes the running
// log section (with the command line's overrides) and next's access.
func reloadable(next, running *config.Config, fileLog config.Log) error {
	if next.Log.Format != fileLog.Format || next.Log.Level != fileLog.Level {
		return errors.New("log.format or log.level changed: restart meshd to apply it")
	}
	if !reflect.DeepEqual(next.Telemetry, running.Telemetry) {
		return errors.New("telemetry changed: restart meshd to apply it")
	}
	access := next.Log.Access
	next.Log = running.Log
	next.Log.Access = access
	return nil
}

func cmdRun(args []string, stdout, stderr io.Writer) int {
	fs := newFlags("run", "run --config FILE\n\nStarts the sidecar. SIGTERM or SIGINT drains in-flight requests (up to proxy.drain)\nand exits 0; SIGHUP reloads the config (a bad file is refused and the old one keeps serving).", stderr)
	file := fs.String("config", "meshd.yaml", "config file")
	logFormat := fs.String("log-format", "", "override log.format: auto, text or json")
	logLevel := fs.String("log-level", "", "override log.level: debug, info, warn or error")
	if code, ok := parseFlags(fs, args, stdout); !ok {
		return code
	}
	cfg, err := config.Load(*file)
	if err != nil {
		fmt.Fprintf(stderr, "meshd: config %s is not valid:\n%v\n", *file, err)
		return 1
	}
	fileLog := cfg.Log // before the flags override it
	if *logFormat != "" {
		cfg.Log.Format = *logFormat
	}
	if *logLevel != "" {
		cfg.Log.Level = *logLevel
	}
	log, err := telemetry.NewLogger(stderr, cfg.Log.Format, cfg.Log.Level)
	if err != nil {
		fmt.Fprintf(stderr, "meshd: %v\n", err)
		return 1
	}
	slog.SetDefault(log)
	log.Info("starting", "version", buildinfo.String(), "config", *file)

	tel, err := telemetry.Setup(context.Background(), cfg.TelemetryConfig(), log)
	if err != nil {
		log.Error("cannot start: telemetry", "err", err)
		return 1
	}
	tel.SetGlobal()
	defer func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := tel.Shutdown(ctx); err != nil {
			log.Warn("telemetry: flushing spans on exit", "err", err)
		}
	}()

	sc, err := sidecar.New(cfg, log, tel)
	if err != nil {
		log.Error("cannot start", "err", err)
		return 1
	}
	if err := sc.Start(); err != nil {
		log.Error("cannot start", "err", err)
		return 1
	}
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
	for sig := range sigs {
		if sig == syscall.SIGHUP {
			next, err := config.Load(*file)
			if err != nil {
				log.Error("reload refused: config not valid; the running config stays", "config", *file, "err", err)
				continue
			}
			if err := reloadable(next, cfg, fileLog); err != nil {
				log.Error("reload refused; the running config stays", "config", *file, "err", err)
				continue
			}
			if err := sc.Reload(next); err != nil {
				log.Error("reload refused; the running config stays", "config", *file, "err", err)
				continue
			}
			continue
		}
		log.Info("signal received; draining", "signal", sig.String(), "deadline", sc.Config().Proxy.Drain)
		break
	}
	signal.Stop(sigs)
	ctx, cancel := context.WithTimeout(context.Background(), sc.Config().Proxy.Drain)
	defer cancel()
	start := time.Now()
	if err := sc.Shutdown(ctx); err != nil {
		log.Warn("stopped with requests cut off at the drain deadline", "after", time.Since(start).Round(time.Millisecond))
		return 0
	}
	log.Info("stopped", "after", time.Since(start).Round(time.Millisecond))
	return 0
}
