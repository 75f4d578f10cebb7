"""The defaults of the Envoy configuration ``agent/envoy_config.py`` builds, in a module
of their own so ``trustmesh envoy config`` can show them in its help without importing
the builder (and, through it, X.509 and JOSE code)."""

# Debian's and Ubuntu's CA bundle (the path Envoy's own images use too)
SYSTEM_CA_FILE = "/etc/ssl/certs/ca-certificates.crt"
DEFAULT_MAX_CONNECTION_DURATION = "300s"
