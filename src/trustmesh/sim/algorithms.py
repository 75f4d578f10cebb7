"""The signing algorithms a simulated cluster's service-account issuer offers (a light
module: the CLI names them in its help without importing the issuer's web server)."""

SUPPORTED_ALGS = ("RS256", "ES256")
