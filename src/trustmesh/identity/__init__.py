"""Identity: signing keys and their life cycle, sealing keys at rest, compact JWS
verification, JWT-SVID minting and verification, and verification of Kubernetes
service-account tokens against their cluster's keys. No web framework imports here."""
