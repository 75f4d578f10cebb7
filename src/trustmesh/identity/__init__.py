"""Identity: signing keys, JWT-SVIDs, SPIFFE IDs, service-account token verification,
RFC 8693 token exchange and RFC 7662 introspection. No web framework imports here."""
