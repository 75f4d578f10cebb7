"""The SPIFFE credential folder (``--credential-dir``): the files spiffe-helper writes,
for software that reads PEM files rather than a socket (DESIGN §9).

* ``svid.pem`` — the chain, leaf first (mode 0644);
* ``svid_key.pem`` — the private key, PKCS#8 (mode 0600: the only place the key is
  ever written);
* ``svid_bundle.pem`` — the trust bundle: our roots, then every federated trust
  domain's (mode 0644).

Each file is replaced atomically (``common/files.write_atomically``: a new file beside
it, fsynced, renamed over it), so a reader sees a whole old file or a whole new one;
the key is written before the certificate, so a reader that loads the certificate
first and the key second never pairs a new certificate with an old key (an old
certificate may meet the new key between the two renames: readers that reload on a
change see the pair settle). The folder is
created 0700 if missing; an existing one must be a directory that only its owner may
write."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography import x509

from trustmesh.common.errors import ConfigError
from trustmesh.common.files import write_atomically
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
        """Create the folder or check the existing one (ConfigError, one line)."""
        try:
            self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
            st = os.lstat(self.path)
        except OSError as exc:
            raise ConfigError(f"cannot use credential dir {self.path}: {exc.strerror}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise ConfigError(f"credential dir {self.path} is not a directory (or is a symlink)")
        if st.st_uid != os.geteuid():
            raise ConfigError(
                f"credential dir {self.path} is owned by uid {st.st_uid}, not by the user "
                f"running the sidecar (uid {os.geteuid()})"
            )
        if st.st_mode & 0o022:
            raise ConfigError(
                f"credential dir {self.path} is writable by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}): chmod go-w {self.path}"
            )

    def write(self, svid: X509Svid, bundles: dict[str, tuple[x509.Certificate, ...]]) -> None:
        ours = svid.trust_domain
        order = [ours, *sorted(domain for domain in bundles if domain != ours)]
        roots = [cert for domain in order for cert in bundles.get(domain, ())]
        write_atomically(self.path / BUNDLE_FILE, pem_certificates(roots), PUBLIC_MODE)
        write_atomically(self.path / KEY_FILE, svid.key_pem(), KEY_MODE)
        write_atomically(self.path / CERT_FILE, svid.chain_pem(), PUBLIC_MODE)
