package config

import (
	"fmt"
	"reflect"
	"strconv"
	"strings"
	"time"

	"gopkg.in/yaml.v3"
)

// Error is one problem in a config file, located by line and key path.
type Error struct {
	File string
	Line int
	// Key is the dotted path of the offending key, e.g. "upstreams.payments.timeout".
	Key string
	Msg string
}

// Error formats the problem as FILE:LINE: KEY: MESSAGE.
func (e *Error) Error() string {
	var b strings.Builder
	if e.File != "" {
		b.WriteString(e.File)
		b.WriteByte(':')
	}
	if e.Line > 0 {
		b.WriteString(strconv.Itoa(e.Line))
		b.WriteByte(':')
	}
	if b.Len() > 0 {
		b.WriteByte(' ')
	}
	if e.Key != "" {
		b.WriteString(e.Key)
		b.WriteString(": ")
	}
	b.WriteString(e.Msg)
	return b.String()
}

// Errors is every problem found in one file. It implements error.
type Errors []*Error

// Error lists every problem, one per line.
func (es Errors) Error() string {
	parts := make([]string, len(es))
	for i, e := range es {
		parts[i] = e.Error()
	}
	return strings.Join(parts, "\n")
}

// nodeDecoder is implemented by types that accept more than one YAML shape.
type nodeDecoder interface {
	decodeNode(d *decoder, n *yaml.Node, path string)
}

// decoder walks a YAML tree into Go values strictly: unknown keys, duplicate
// keys and ill-typed scalars are all recorded, and decoding goes on so that
// one pass reports every problem.
type decoder struct {
	file  string
	errs  Errors
	lines map[string]int
}

var durationType = reflect.TypeOf(time.Duration(0))

func (d *decoder) fail(n *yaml.Node, path, format string, args ...any) {
	line := 0
	if n != nil {
		line = n.Line
	}
	d.errs = append(d.errs, &Error{File: d.file, Line: line, Key: path, Msg: fmt.Sprintf(format, args...)})
}

func join(path, key string) string {
	if path == "" {
		return key
	}
	return path + "." + key
}

func kindName(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "a mapping"
	case yaml.SequenceNode:
		return "a list"
	case yaml.ScalarNode:
		if n.Tag == "!!null" {
			return "nothing"
		}
		return fmt.Sprintf("%q", n.Value)
	}
	return "something else"
}

func (d *decoder) decode(n *yaml.Node, v reflect.Value, path string) {
	for n.Kind == yaml.AliasNode {
		n = n.Alias
	}
	if n.Kind == yaml.DocumentNode {
		if len(n.Content) == 0 {
			return
		}
		n = n.Content[0]
	}
	d.lines[path] = n.Line
	if v.CanAddr() {
		if nd, ok := v.Addr().Interface().(nodeDecoder); ok {
			nd.decodeNode(d, n, path)
			return
		}
	}
	if v.Kind() == reflect.Pointer {
		if n.Kind == yaml.ScalarNode && n.Tag == "!!null" {
			return
		}
		if v.IsNil() {
			v.Set(reflect.New(v.Type().Elem()))
		}
		d.decode(n, v.Elem(), path)
		return
	}
	if v.Type() == durationType {
		if n.Kind != yaml.ScalarNode {
			d.fail(n, path, "want a duration such as 2s or 500ms, have %s", kindName(n))
			return
		}
		dur, err := time.ParseDuration(n.Value)
		if err != nil {
			if n.Value == "0" {
				v.SetInt(0)
				return
			}
			d.fail(n, path, "bad duration %q (want e.g. 2s, 500ms, 1m30s)", n.Value)
			return
		}
		if dur < 0 {
			d.fail(n, path, "duration must not be negative, have %s", n.Value)
			return
		}
		v.SetInt(int64(dur))
		return
	}
	switch v.Kind() {
	case reflect.Struct:
		d.decodeStruct(n, v, path)
	case reflect.Map:
		if n.Kind != yaml.MappingNode {
			d.fail(n, path, "want a mapping, have %s", kindName(n))
			return
		}
		if v.IsNil() {
			v.Set(reflect.MakeMap(v.Type()))
		}
		seen := map[string]bool{}
		for i := 0; i+1 < len(n.Content); i += 2 {
			k, val := n.Content[i], n.Content[i+1]
			key := k.Value
			if seen[key] {
				d.fail(k, join(path, key), "duplicate key")
				continue
			}
			seen[key] = true
			d.lines[join(path, key)] = k.Line
			elem := reflect.New(v.Type().Elem()).Elem()
			d.decode(val, elem, join(path, key))
			v.SetMapIndex(reflect.ValueOf(key).Convert(v.Type().Key()), elem)
		}
	case reflect.Slice:
		if n.Kind == yaml.ScalarNode && n.Tag == "!!null" {
			return
		}
		if n.Kind != yaml.SequenceNode {
			d.fail(n, path, "want a list, have %s", kindName(n))
			return
		}
		s := reflect.MakeSlice(v.Type(), len(n.Content), len(n.Content))
		for i, item := range n.Content {
			d.decode(item, s.Index(i), fmt.Sprintf("%s[%d]", path, i))
		}
		v.Set(s)
	case reflect.String:
		if n.Kind != yaml.ScalarNode || n.Tag == "!!null" {
			d.fail(n, path, "want a string, have %s", kindName(n))
			return
		}
		v.SetString(n.Value)
	case reflect.Bool:
		b, err := strconv.ParseBool(n.Value)
		if n.Kind != yaml.ScalarNode || err != nil {
			d.fail(n, path, "want true or false, have %s", kindName(n))
			return
		}
		v.SetBool(b)
	case reflect.Int, reflect.Int32, reflect.Int64:
		i, err := strconv.ParseInt(n.Value, 0, 64)
		if n.Kind != yaml.ScalarNode || err != nil || v.OverflowInt(i) {
			d.fail(n, path, "want a whole number, have %s", kindName(n))
			return
		}
		v.SetInt(i)
	case reflect.Uint32, reflect.Uint, reflect.Uint64:
		i, err := strconv.ParseUint(n.Value, 0, 64)
		if n.Kind != yaml.ScalarNode || err != nil || v.OverflowUint(i) {
			d.fail(n, path, "want a whole number ≥ 0, have %s", kindName(n))
			return
		}
		v.SetUint(i)
	case reflect.Float64:
		f, err := strconv.ParseFloat(n.Value, 64)
		if n.Kind != yaml.ScalarNode || err != nil {
			d.fail(n, path, "want a number, have %s", kindName(n))
			return
		}
		v.SetFloat(f)
	default:
		d.fail(n, path, "internal: cannot decode into %s", v.Type())
	}
}

func (d *decoder) decodeStruct(n *yaml.Node, v reflect.Value, path string) {
	if n.Kind == yaml.ScalarNode && n.Tag == "!!null" {
		return
	}
	if n.Kind != yaml.MappingNode {
		d.fail(n, path, "want a mapping, have %s", kindName(n))
		return
	}
	t := v.Type()
	fields := map[string]int{}
	var known []string
	for i := 0; i < t.NumField(); i++ {
		tag := t.Field(i).Tag.Get("yaml")
		name, _, _ := strings.Cut(tag, ",")
		if name == "" || name == "-" {
			continue
		}
		fields[name] = i
		known = append(known, name)
	}
	seen := map[string]bool{}
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, val := n.Content[i], n.Content[i+1]
		key := k.Value
		kp := join(path, key)
		idx, ok := fields[key]
		if !ok {
			d.fail(k, kp, "unknown key (known here: %s)", strings.Join(known, ", "))
			continue
		}
		if seen[key] {
			d.fail(k, kp, "duplicate key")
			continue
		}
		seen[key] = true
		d.lines[kp] = k.Line
		d.decode(val, v.Field(idx), kp)
	}
}
