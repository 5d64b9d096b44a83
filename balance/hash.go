package balance

import (
	"errors"
	"fmt"
	"math/bits"
	"net/textproto"
	"slices"
	"sort"
	"strings"
	"time"
)

func init() {
	Register("hash", func(cfg Config) (Policy, error) { return newHashPolicy("hash", cfg) })
	Register("ip_hash", func(cfg Config) (Policy, error) { return newHashPolicy("ip_hash", cfg) })
}

// DefaultFallback is the algorithm hash and ip_hash use for a request
// without a key when Config.Fallback is empty.
const DefaultFallback = "round_robin"

type keyKind uint8

const (
	keyClientIP keyKind = iota
	keyHeader
	keyCookie
	keyQuery
	keyPath
	keyURL
)

// hashKey says where a request's hash key comes from.
type hashKey struct {
	kind keyKind
	// name is the header (canonical form), cookie or query parameter name.
	name string
}

var errKeySyntax = errors.New("want header:NAME, cookie:NAME, query:NAME, path or url")

// parseKey parses Config.Key.
func parseKey(s string) (hashKey, error) {
	switch s {
	case "":
		return hashKey{}, fmt.Errorf("hash needs a key: %w", errKeySyntax)
	case "path":
		return hashKey{kind: keyPath}, nil
	case "url":
		return hashKey{kind: keyURL}, nil
	}
	kind, name, ok := strings.Cut(s, ":")
	if !ok {
		return hashKey{}, fmt.Errorf("bad key %q: %w", s, errKeySyntax)
	}
	switch kind {
	case "header":
		if !isToken(name) {
			return hashKey{}, fmt.Errorf("bad key %q: header name must be a non-empty HTTP token", s)
		}
		return hashKey{kind: keyHeader, name: textproto.CanonicalMIMEHeaderKey(name)}, nil
	case "cookie":
		if !isToken(name) {
			return hashKey{}, fmt.Errorf("bad key %q: cookie name must be a non-empty HTTP token", s)
		}
		return hashKey{kind: keyCookie, name: name}, nil
	case "query":
		if name == "" || strings.ContainsAny(name, "&=#;%+ \t") || !isPrintable(name) {
			return hashKey{}, fmt.Errorf("bad key %q: query parameter name must be non-empty, printable and unescaped", s)
		}
		return hashKey{kind: keyQuery, name: name}, nil
	}
	return hashKey{}, fmt.Errorf("bad key %q: %w", s, errKeySyntax)
}

// isToken reports whether s is a non-empty RFC 9110 token.
func isToken(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9':
		case strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0:
		default:
			return false
		}
	}
	return true
}

func isPrintable(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < 0x21 || s[i] > 0x7e {
			return false
		}
	}
	return true
}

// hash returns the hash of req's key and whether the request has one.
// It does not allocate.
func (k hashKey) hash(req *Request) (uint64, bool) {
	if k.kind == keyClientIP {
		if !req.ClientIP.IsValid() {
			return 0, false
		}
		b := req.ClientIP.Unmap().As16() // IPv4 hashes like its IPv4-mapped form
		return hashWords(le64(b[:8]), le64(b[8:])), true
	}
	r := req.HTTP
	if r == nil {
		return 0, false
	}
	var v string
	switch k.kind {
	case keyHeader:
		if k.name == "Host" { // the server moves Host out of the header map
			v = r.Host
		} else if vs := r.Header[k.name]; len(vs) > 0 {
			v = vs[0]
		}
	case keyCookie:
		v = cookieValue(r.Header["Cookie"], k.name)
	case keyQuery:
		if r.URL != nil {
			v = queryValue(r.URL.RawQuery, k.name)
		}
	case keyPath, keyURL:
		if r.URL == nil {
			return 0, false
		}
		v = r.URL.Path
		if v == "" {
			v = "/"
		}
		if k.kind == keyURL && r.URL.RawQuery != "" {
			return hashString(hashString(hashString(seedKey, v), "?"), r.URL.RawQuery), true
		}
	}
	if v == "" {
		return 0, false
	}
	return hashString(seedKey, v), true
}

// cookieValue finds cookie name in Cookie header lines without allocating
// (http.Request.Cookie allocates). Surrounding double quotes are removed.
func cookieValue(lines []string, name string) string {
	for _, line := range lines {
		for line != "" {
			var part string
			part, line, _ = strings.Cut(line, ";")
			part = strings.TrimLeft(part, " \t")
			n, v, ok := strings.Cut(part, "=")
			if !ok || n != name {
				continue
			}
			v = strings.TrimRight(v, " \t")
			if len(v) >= 2 && v[0] == '"' && v[len(v)-1] == '"' {
				v = v[1 : len(v)-1]
			}
			if v != "" {
				return v
			}
		}
	}
	return ""
}

// queryValue returns the first non-empty raw (still escaped) value of
// parameter name in a raw query, without allocating (URL.Query allocates).
func queryValue(raw, name string) string {
	for raw != "" {
		var part string
		part, raw, _ = strings.Cut(raw, "&")
		n, v, _ := strings.Cut(part, "=")
		if n == name && v != "" {
			return v
		}
	}
	return ""
}

// Hashing. Keys are hashed with a fixed, process-independent function so that
// every sidecar sends a key to the same instance.
const (
	seedKey    = 0x9e3779b97f4a7c15
	seedOffset = 0xc2b2ae3d27d4eb4f
	seedSkip   = 0x165667b19e3779f9
	mulA       = 0x87c37b91114253d5
	mulB       = 0x4cf5ad432745937f
)

// hashString hashes s eight bytes at a time (byte loads that the compiler
// combines) and finishes with a strong avalanche.
func hashString(seed uint64, s string) uint64 {
	h := seed ^ uint64(len(s))*mulA
	for len(s) >= 8 {
		w := uint64(s[0]) | uint64(s[1])<<8 | uint64(s[2])<<16 | uint64(s[3])<<24 |
			uint64(s[4])<<32 | uint64(s[5])<<40 | uint64(s[6])<<48 | uint64(s[7])<<56
		h = mixWord(h, w)
		s = s[8:]
	}
	if len(s) > 0 {
		var w uint64
		for i := len(s) - 1; i >= 0; i-- {
			w = w<<8 | uint64(s[i])
		}
		h = mixWord(h, w)
	}
	return fmix64(h)
}

func hashWords(a, b uint64) uint64 {
	n := uint64(16)
	h := seedKey ^ n*mulA // as hashString for 16 bytes
	return fmix64(mixWord(mixWord(h, a), b))
}

func mixWord(h, w uint64) uint64 {
	w *= mulA
	w = bits.RotateLeft64(w, 31)
	w *= mulB
	h ^= w
	h = bits.RotateLeft64(h, 27)
	return h*5 + 0x52dce729
}

// fmix64 is the MurmurHash3 finaliser: every input bit affects every output
// bit.
func fmix64(h uint64) uint64 {
	h ^= h >> 33
	h *= 0xff51afd7ed558ccd
	h ^= h >> 33
	h *= 0xc4ceb9fe1a85ec53
	h ^= h >> 33
	return h
}

func le64(b []byte) uint64 {
	_ = b[7]
	return uint64(b[0]) | uint64(b[1])<<8 | uint64(b[2])<<16 | uint64(b[3])<<24 |
		uint64(b[4])<<32 | uint64(b[5])<<40 | uint64(b[6])<<48 | uint64(b[7])<<56
}

// newHashPolicy builds hash (keyed by cfg.Key) or ip_hash (keyed by the
// client address) with its fallback.
func newHashPolicy(name string, cfg Config) (Policy, error) {
	key := hashKey{kind: keyClientIP}
	keyText := "client ip"
	if name == "hash" {
		var err error
		if key, err = parseKey(cfg.Key); err != nil {
			return nil, &FieldError{Field: "key", Err: err}
		}
		keyText = cfg.Key
	}
	fbName := cfg.Fallback
	if fbName == "" {
		fbName = DefaultFallback
	}
	if fbName == "hash" || fbName == "ip_hash" {
		return nil, &FieldError{Field: "fallback", Err: fmt.Errorf("%q cannot be the fallback: it needs a key as well", fbName)}
	}
	fb, err := build(Config{Algorithm: fbName, Decay: cfg.Decay, SlowStart: cfg.SlowStart})
	if err != nil {
		var fe *FieldError
		if errors.As(err, &fe) {
			err = fe.Err
		}
		return nil, &FieldError{Field: "fallback", Err: err}
	}
	missing := "fallback: key missing (" + fbName + ")"
	if name == "ip_hash" {
		missing = "fallback: client ip unknown (" + fbName + ")"
	}
	reasons := hashReasons{
		hit:     "hash " + keyText,
		next:    "hash " + keyText + ", next usable",
		missing: missing,
	}
	p := newPolicy(name, cfg, true, func(eps []*Endpoint, units []uint64, now time.Time) Picker {
		var fp Picker
		if tp, ok := fb.(TimedPolicy); ok {
			fp = tp.NewPickerAt(eps, now)
		} else {
			fp = fb.NewPicker(eps)
		}
		return &hashPicker{eps: eps, table: maglevTable(eps, units), key: key, fallback: fp, reasons: reasons}
	})
	if tp, ok := fb.(TimedPolicy); ok {
		p.extraSlowStart = tp.SlowStart()
	}
	return p, nil
}

type hashReasons struct{ hit, next, missing string }

// hashProbe is how many following table slots a pick tries when the key's
// instance is unusable, before it scans the list.
const hashProbe = 32

// hashPicker maps a key's hash through a Maglev lookup table to an instance.
// When that instance is unusable the following table slots are tried: they
// hold instances in a key-independent shuffled order, so the displaced keys
// spread over the others in proportion to their weights, and always the same
// way for the same key.
type hashPicker struct {
	eps      []*Endpoint
	table    []uint32
	key      hashKey
	fallback Picker
	reasons  hashReasons
}

func (p *hashPicker) Pick(req *Request) (*Endpoint, error) {
	h, ok := p.key.hash(req)
	if !ok {
		e, err := p.fallback.Pick(req)
		if err == nil {
			req.Reason = p.reasons.missing
		}
		return e, err
	}
	req.Candidates = len(p.eps)
	req.Score = 0
	m := len(p.table)
	pos := reduce(h, m)
	if e := p.eps[p.table[pos]]; req.Usable(e) {
		req.Reason = p.reasons.hit
		return e, nil
	}
	for range min(m-1, hashProbe) {
		if pos++; pos == m {
			pos = 0
		}
		if e := p.eps[p.table[pos]]; req.Usable(e) {
			req.Reason = p.reasons.next
			return e, nil
		}
	}
	e, err := scanFrom(p.eps, reduce(fmix64(h^seedSkip), len(p.eps)), req)
	if err == nil {
		req.Reason = p.reasons.next
	}
	return e, err
}

// maglevSizes are the Maglev table sizes (primes near powers of two). The
// size must not change with every membership change, or nearly every key
// would move: a list of n instances uses the smallest size with at least
// maglevPerInstance slots per instance (the largest size beyond 20971
// instances), so the size steps up only when the list grows past 655, 1310,
// 2621, 5242 or 10485 instances, and crossing a step moves most keys once.
// 100 slots per
// instance keep every instance's share of keys within about 1% of its weight
// and the keys moved by a change close to the minimum.
var maglevSizes = [...]int{65537, 131071, 262147, 524287, 1048573, 2097143}

const maglevPerInstance = 100

func maglevSize(n int) int {
	for _, m := range maglevSizes {
		if m >= maglevPerInstance*n {
			return m
		}
	}
	last := maglevSizes[len(maglevSizes)-1]
	if n > last {
		return nextPrime(n) // absurdly large lists: one slot each at least
	}
	return last
}

// maglevTable builds the lookup table of Maglev hashing (Eisenbud et al.,
// NSDI 2016): every instance walks its own permutation of the table, derived
// from its ID, claiming the next free slot on each of its turns. Because
// permutations depend on the ID only, adding or removing one instance mostly
// changes the slots that instance gains or loses.
//
// Weights: each instance gets a number of turns (slots) proportional to its
// weight (largest remainder, at least one), spread evenly over the rounds of
// the heaviest one; with equal weights this is the original round-robin
// order. Instances take turns in order of ID, so the table does not depend on
// the order in which discovery lists them. Cost O(m) turns plus the probing
// for free slots.
func maglevTable(eps []*Endpoint, units []uint64) []uint32 {
	n := len(eps)
	m := maglevSize(n)
	order := make([]int32, n)
	for i := range order {
		order[i] = int32(i)
	}
	slices.SortFunc(order, func(a, b int32) int { return strings.Compare(eps[a].ID, eps[b].ID) })
	count := apportion(units, m)
	rounds := 0
	for _, c := range count {
		rounds = max(rounds, c)
	}
	pos := make([]uint64, n)
	skip := make([]uint64, n)
	for i, e := range eps {
		pos[i] = uint64(reduce(hashString(seedOffset, e.ID), m))
		skip[i] = uint64(reduce(hashString(seedSkip, e.ID), m-1)) + 1
	}
	// Instance i takes its k-th turn in round k*rounds/count[i]. Rounds are
	// FIFO buckets (singly linked through next), filled in ID order.
	head := make([]int32, rounds)
	tail := make([]int32, rounds)
	for r := range head {
		head[r], tail[r] = -1, -1
	}
	next := make([]int32, n)
	turns := make([]int, n)
	enqueue := func(r int, i int32) {
		next[i] = -1
		if tail[r] < 0 {
			head[r] = i
		} else {
			next[tail[r]] = i
		}
		tail[r] = i
	}
	for _, i := range order {
		enqueue(0, i)
	}
	const free = ^uint32(0)
	table := make([]uint32, m)
	for i := range table {
		table[i] = free
	}
	filled := 0
	for r := 0; r < rounds && filled < m; r++ {
		for i := head[r]; i >= 0; {
			nx := next[i]
			p := pos[i]
			for table[p] != free {
				if p += skip[i]; p >= uint64(m) {
					p -= uint64(m)
				}
			}
			table[p] = uint32(i)
			filled++
			if p += skip[i]; p >= uint64(m) {
				p -= uint64(m)
			}
			pos[i] = p
			turns[i]++
			if k := turns[i]; k < count[i] && filled < m {
				enqueue(k*rounds/count[i], i)
			}
			i = nx
		}
	}
	// The counts sum to at least m, so the table is full; should rounding
	// ever leave a slot free, keep taking turns in ID order.
	for filled < m {
		for _, i := range order {
			if filled == m {
				break
			}
			p := pos[i]
			for table[p] != free {
				if p += skip[i]; p >= uint64(m) {
					p -= uint64(m)
				}
			}
			table[p] = uint32(i)
			filled++
			pos[i] = p
		}
	}
	return table
}

// apportion divides m slots in proportion to units by largest remainder,
// giving each at least one (so the total may exceed m slightly when there
// are very light instances; the table simply fills up before they are all
// used).
func apportion(units []uint64, m int) []int {
	var sum float64
	for _, u := range units {
		sum += float64(u)
	}
	count := make([]int, len(units))
	rem := make([]float64, len(units))
	order := make([]int, len(units))
	got := 0
	for i, u := range units {
		exact := float64(u) * float64(m) / sum
		c := int(exact)
		rem[i] = exact - float64(c)
		if c < 1 {
			c, rem[i] = 1, -1
		}
		count[i] = c
		got += c
		order[i] = i
	}
	sort.SliceStable(order, func(a, b int) bool { return rem[order[a]] > rem[order[b]] })
	for _, i := range order {
		if got >= m || rem[i] < 0 {
			break
		}
		count[i]++
		got++
	}
	return count
}

// nextPrime returns the smallest prime >= n (n small enough for trial
// division to be instant).
func nextPrime(n int) int {
	if n <= 2 {
		return 2
	}
	if n%2 == 0 {
		n++
	}
	for ; ; n += 2 {
		prime := true
		for d := 3; d*d <= n; d += 2 {
			if n%d == 0 {
				prime = false
				break
			}
		}
		if prime {
			return n
		}
	}
}
