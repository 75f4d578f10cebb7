"""The base every package may use: the error hierarchy, the clock, backoff and
failover, atomic files, HTTP plumbing and serving, tracing, addresses, the RFC 8693
URNs. Imports nothing else of trustmesh."""
