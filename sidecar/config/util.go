package config

import (
	"errors"
	"io"
	"reflect"
	"regexp"
	"strconv"
)

func reflectValue(p any) reflect.Value { return reflect.ValueOf(p).Elem() }

func errEOF(err error) error {
	if errors.Is(err, io.EOF) {
		return io.EOF
	}
	return errors.New("not eof")
}

var yamlLineRe = regexp.MustCompile(`line (\d+)`)

func yamlLine(err error) int {
	m := yamlLineRe.FindStringSubmatch(err.Error())
	if m == nil {
		return 0
	}
	n, _ := strconv.Atoi(m[1])
	return n
}
