"""OAuth 2.0 and the standards around it, on top of identity and the registry: RFC 8693
token exchange (``rfc8693``), RFC 7662 introspection (``rfc7662``), and the OpenID
Shared Signals transmitter of the revocation list — RFC 8417 Security Event Tokens
(``rfc8417``), RFC 8936 poll delivery (``rfc8936``) and the SSF metadata and delivery
state (``ssf``)."""
