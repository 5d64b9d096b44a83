//go:build !unix

package h1

// alive cannot look at the socket here; the resend rule still holds.
func (c *conn) alive() bool { return !c.leftover() }
