"""The SPIFFE credential folder (``--credential-dir``): the files spiffe-helper writes,
for software that reads PEM files rather than a socket (DESIGN §9).

* ``svid.pem`` — the chain, leaf first (mode 0644);
* ``svid_key.pem`` — the private key, PKCS#8 (mode 0600: the only place the key is
  ever written);
* ``svid_bundle.pem`` — the trust bundle: our trust domain's roots (mode 0644); not a
  federated domain's, which one flat file would merge with ours (SPIFFE Federation
  §4.2).

Each file is replaced atomically (``common/files.write_atomically``: a new file beside
it, fsynced, renamed over it), so a reader sees a whole old file or a whole new one;
the key is written before the certificate, so a reader that loads the certificate
first and the key second never pairs a new certificate with an old key (an old
certificate may meet the new key between the two renames: readers that reload on a
change see the pair settle). The folder is a private directory
(``common/files.private_directory``): created 0700, or an existing directory of ours
that no one else may write, tightened to 0700 — the key in it is for workloads that run
as the sidecar's user."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509

from trustmesh.common.files import private_directory, write_atomically
from trustmesh.sidecar.x509 import X509Svid, pem_certificates

CERT_FILE = "svid.pem"
KEY_FILE = "svid_key.pem"
BUNDLE_FILE = "svid_bundle.pem"
KEY_MODE = 0o600
PUBLIC_MODE = 0o644


class CredentialFolder:
    def __init__(self, path: Path) -> None:
        self.path = path

    def prepare(self) -> None:
        """Create the folder or check the existing one, as a data directory is checked
        (``common/files.private_directory``: ours, not a symlink, 0700); ConfigError, one
        line, otherwise."""
        private_directory(self.path, "credential dir")

    def write(self, svid: X509Svid, bundles: dict[str, tuple[x509.Certificate, ...]]) -> None:
        ours = svid.trust_domain
        order = [ours, *sorted(domain for domain in bundles if domain != ours)]
        roots = [cert for domain in order for cert in bundles.get(domain, ())]
        write_atomically(self.path / BUNDLE_FILE, pem_certificates(roots), PUBLIC_MODE)
        write_atomically(self.path / KEY_FILE, svid.key_pem(), KEY_MODE)
        write_atomically(self.path / CERT_FILE, svid.chain_pem(), PUBLIC_MODE)
