"""twistedgw: a sandbox gateway daemon (Twisted, Klein, Autobahn, Docker)."""
