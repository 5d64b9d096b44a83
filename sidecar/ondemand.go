package sidecar

import "context"

// onDemand starts a watch for a forward-proxy name that is not configured,
// when Consul discovery on demand allows it. It returns (nil, nil) when the
// name is simply unknown.
func (s *Sidecar) onDemand(ctx context.Context, name string) (*upstream, *routeError) {
	return nil, nil
}
