"""Bastion's CA (for HTTPS interception) and the trust bundles built from it.

The CA lives in `--home`, which is also mitmproxy's `confdir`, in the files mitmproxy reads:
`mitmproxy-ca.pem` (certificate + private key, mode 0600) and `mitmproxy-ca-cert.pem` (the certificate alone,
the one to hand out). To bring your own CA, put its certificate and key into `mitmproxy-ca.pem` before the
first start. Each deployment gets its own CA on first start; none is ever shipped.

Two bundles are derived from it:

- the **client bundle** (`<home>/ca-bundle.pem`): the system roots (certifi) plus Bastion's CA. Python, curl
  and Go *replace* their roots with `SSL_CERT_FILE`/`REQUESTS_CA_BUNDLE`/`CURL_CA_BUNDLE`, so the bundle must
  keep the public roots too. Node appends (`NODE_EXTRA_CA_CERTS`) and gets the CA alone.
- the **upstream trust** (`<home>/upstream-trust.pem`): certifi plus `--upstream-ca`. mitmproxy's
  `ssl_verify_upstream_trusted_ca` replaces certifi, so a private CA alone would break every public API.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import certifi

from bastion.config import ConfigError, Home

CA_BASENAME = "mitmproxy"  # the name mitmproxy's CertStore looks for in confdir
CA_ORGANIZATION = "Bastion"
CA_COMMON_NAME = "Bastion proxy CA"
KEY_SIZE = 2048
UPSTREAM_TRUST_NAME = "upstream-trust.pem"


class CAMissing(Exception):
    """No CA in this home yet: the sidecar creates it on its first start."""


def ca_key_file(home: Home) -> Path:
    return home.path / f"{CA_BASENAME}-ca.pem"


def ensure_ca(home: Home) -> Path:
    """Create the CA in `home` if there is none (blocking: call from a thread). Returns the certificate path."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from mitmproxy.certs import CertStore

    home.ensure()
    key_file = ca_key_file(home)
    if not key_file.exists():
        CertStore.create_store(home.path, CA_BASENAME, KEY_SIZE, organization=CA_ORGANIZATION,
                               cn=CA_COMMON_NAME)
    if not home.ca_cert.exists():  # a CA brought in as mitmproxy-ca.pem only: publish its certificate
        certs = x509.load_pem_x509_certificates(key_file.read_bytes())
        _atomic_write(home.ca_cert, certs[0].public_bytes(serialization.Encoding.PEM))
    return home.ca_cert


def existing_ca(home: Home) -> Path:
    """The CA certificate path; CAMissing if the sidecar has not created it yet."""
    if not home.ca_cert.is_file():
        raise CAMissing(
            f"no Bastion CA in {home.path}: start `bastion serve --home {home.path}` once (it creates the CA), "
            "or point --home / BASTION_HOME at the sidecar's home"
        )
    return home.ca_cert


def read_pem_certificates(path: Path, what: str) -> bytes:
    """The PEM certificates in `path`, checked to parse. ConfigError with a clear message otherwise."""
    from cryptography import x509

    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{what}: cannot read {path}: {e.strerror or e}") from None
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise ConfigError(f"{what}: {path} holds no PEM certificate")
    return data if data.endswith(b"\n") else data + b"\n"


def _system_roots() -> bytes:
    data = Path(certifi.where()).read_bytes()
    return data if data.endswith(b"\n") else data + b"\n"


def write_client_bundle(home: Home, ca_cert: Path | None = None) -> Path:
    """Write `<home>/ca-bundle.pem` = system roots + Bastion CA (blocking). Falls back to a private file in
    the temp directory when home is read-only (an agent container that mounts the sidecar's home)."""
    cert = read_pem_certificates(ca_cert or existing_ca(home), "Bastion CA")
    content = _system_roots() + cert
    try:
        _atomic_write(home.ca_bundle, content)
        return home.ca_bundle
    except OSError:
        fallback = Path(tempfile.gettempdir()) / f"bastion-ca-bundle-{os.getuid()}.pem"
        _atomic_write(fallback, content)
        return fallback


def bundle_is_current(bundle: Path, ca_cert: Path) -> bool:
    """Does `bundle` exist and contain the current CA certificate?"""
    try:
        return ca_cert.read_bytes().strip() in bundle.read_bytes()
    except OSError:
        return False


def write_upstream_trust(home: Home, extra_ca: Path) -> Path:
    """Write `<home>/upstream-trust.pem` = system roots + the `--upstream-ca` certificates (blocking)."""
    extra = read_pem_certificates(extra_ca, "--upstream-ca")
    dest = home.path / UPSTREAM_TRUST_NAME
    _atomic_write(dest, _system_roots() + extra)
    return dest


def _atomic_write(dest: Path, content: bytes, mode: int = 0o644) -> None:
    """Readers never see a half-written bundle: write a temp file beside it, then rename over."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        os.chmod(tmp, mode)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
