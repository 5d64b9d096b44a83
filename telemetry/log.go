package telemetry

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"time"

	"go.opentelemetry.io/otel/trace"
)

// Log formats accepted by NewLogger.
const (
	LogAuto = "auto" // text on a terminal, JSON otherwise
	LogText = "text"
	LogJSON = "json"
)

// NewLogger returns a structured logger writing to w. format is auto
// (default when empty: text when w is a terminal, JSON otherwise), text or
// json; level is debug, info (default when empty), warn or error, in any
// letter case. The logger is safe for concurrent use, as slog loggers are.
func NewLogger(w io.Writer, format, level string) (*slog.Logger, error) {
	var lv slog.Level
	switch strings.ToLower(strings.TrimSpace(level)) {
	case "debug":
		lv = slog.LevelDebug
	case "", "info":
		lv = slog.LevelInfo
	case "warn", "warning":
		lv = slog.LevelWarn
	case "error":
		lv = slog.LevelError
	default:
		return nil, fmt.Errorf("log level %q: want debug, info, warn or error", level)
	}
	opts := &slog.HandlerOptions{Level: lv}
	switch strings.ToLower(strings.TrimSpace(format)) {
	case "", LogAuto:
		if isTerminal(w) {
			return slog.New(slog.NewTextHandler(w, opts)), nil
		}
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	case LogText:
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case LogJSON:
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return nil, fmt.Errorf("log format %q: want auto, text or json", format)
}

// isTerminal reports whether w is a character device such as a terminal.
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	st, err := f.Stat()
	if err != nil {
		return false
	}
	return st.Mode()&os.ModeCharDevice != 0
}

// Access describes one request meshd proxied, for AccessLog.
type Access struct {
	Upstream string        // logical service name
	Instance string        // ID of the instance that answered last ("" if none)
	Method   string        // request method
	Path     string        // request path, without the query
	Status   int           // status code sent to the caller (0 if none)
	Duration time.Duration // total time, retries included
	Attempts int           // attempts made (0 when none could be made)
	Bytes    int64         // response body bytes sent to the caller
	Err      string        // error kind or message when the request failed
}

// AccessLog writes one info-level line with message "access" for a. It adds
// trace_id and span_id when ctx carries a valid span context, so the line
// can be joined with the trace. Keys: upstream, instance, method, path,
// status, duration_ms, attempts, bytes, error (only when set), trace_id,
// span_id. It does nothing when l is nil or info is disabled.
func AccessLog(l *slog.Logger, ctx context.Context, a Access) {
	if l == nil {
		return
	}
	ctx = outOfRoom(ctx) // the handler may keep it
	if !l.Enabled(ctx, slog.LevelInfo) {
		return
	}
	var buf [11]slog.Attr
	attrs := append(buf[:0],
		slog.String("upstream", a.Upstream),
		slog.String("instance", a.Instance),
		slog.String("method", a.Method),
		slog.String("path", a.Path),
		slog.Int("status", a.Status),
		slog.Float64("duration_ms", float64(a.Duration)/float64(time.Millisecond)),
		slog.Int("attempts", a.Attempts),
		slog.Int64("bytes", a.Bytes),
	)
	if a.Err != "" {
		attrs = append(attrs, slog.String("error", a.Err))
	}
	if sc := trace.SpanContextFromContext(ctx); sc.IsValid() {
		attrs = append(attrs,
			slog.String("trace_id", sc.TraceID().String()),
			slog.String("span_id", sc.SpanID().String()))
	}
	l.LogAttrs(ctx, slog.LevelInfo, "access", attrs...)
}
