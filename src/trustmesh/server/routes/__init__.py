"""The control plane's HTTP routes (DESIGN §2 to §6), one module per surface: public
documents and health (``public``), the OAuth endpoints (``oauth``), the admin API
(``admin``), what agents fetch (``agents``), the revocation list and its streams
(``revocations``), the audit log (``audit``), the SSF transmitter (``ssf``), the X.509
surfaces (``x509``) and federated trust domains' bundles (``federation``).

Each handler parses, calls one service of the :class:`ControlPlane`, and renders;
errors are raised as :mod:`trustmesh.common.errors` and answered by the app's one
exception handler."""
