"""Certificates for the local control plane: one CA, the API server's serving cert, client certs, SA keys.

ECDSA P-256 keys: fast to generate (cluster start time matters) and accepted by every component.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = datetime.timedelta(days=365)

# The identities each client uses; the groups are what RBAC's bootstrap bindings expect.
CLIENT_IDENTITIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "admin": ("kubernetes-admin", ("system:masters",)),
    "kube-controller-manager": ("system:kube-controller-manager", ()),
    "kube-scheduler": ("system:kube-scheduler", ()),
    "kwok": ("system:kwok-controller", ("system:masters",)),
}


@dataclass(frozen=True)
class KeyPair:
    cert_pem: bytes
    key_pem: bytes


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    encoding, key_format = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8
    return key.private_bytes(encoding, key_format, serialization.NoEncryption())


def _name(common_name: str, organizations: tuple[str, ...] = ()) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org) for org in organizations]
    attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attributes)


def _builder(subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
    )


def make_ca(common_name: str = "telechat-local-ca") -> tuple[KeyPair, ec.EllipticCurvePrivateKey]:
    key = _key()
    name = _name(common_name)
    cert = (
        _builder(name, name, key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)), key


def _leaf(
    ca: KeyPair,
    ca_key: ec.EllipticCurvePrivateKey,
    subject: x509.Name,
    usage: x509.ObjectIdentifier,
    sans: list[x509.GeneralName] | None = None,
) -> KeyPair:
    key = _key()
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    builder = (
        _builder(subject, ca_cert.subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def serving_sans(ips: list[str], dns_names: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    return names


def make_serving_cert(ca: KeyPair, ca_key: ec.EllipticCurvePrivateKey, ips: list[str], dns_names: list[str]) -> KeyPair:
    return _leaf(ca, ca_key, _name("kube-apiserver"), ExtendedKeyUsageOID.SERVER_AUTH, serving_sans(ips, dns_names))


def make_client_cert(ca: KeyPair, ca_key: ec.EllipticCurvePrivateKey, user: str, groups: tuple[str, ...]) -> KeyPair:
    return _leaf(ca, ca_key, _name(user, groups), ExtendedKeyUsageOID.CLIENT_AUTH)


def make_service_account_keys() -> KeyPair:
    """The token signing key pair; `cert_pem` holds the public key (the API server verifies with it)."""
    key = _key()
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return KeyPair(public, _key_pem(key))


def write_pki(directory: Path, serving_ips: list[str], serving_dns: list[str]) -> dict[str, Path]:
    """Write every file the components read; returns name -> path (`<name>.crt`, `<name>.key`)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = make_ca()
    pairs: dict[str, KeyPair] = {
        "ca": ca,
        "apiserver": make_serving_cert(ca, ca_key, serving_ips, serving_dns),
        "service-account": make_service_account_keys(),
    }
    for name, (user, groups) in CLIENT_IDENTITIES.items():
        pairs[name] = make_client_cert(ca, ca_key, user, groups)
    paths: dict[str, Path] = {}
    for name, pair in pairs.items():
        suffix = ".pub" if name == "service-account" else ".crt"
        cert_path = directory / f"{name}{suffix}"
        key_path = directory / f"{name}.key"
        cert_path.write_bytes(pair.cert_pem)
        key_path.write_bytes(pair.key_pem)
        key_path.chmod(0o600)
        paths[f"{name}{suffix}"] = cert_path
        paths[f"{name}.key"] = key_path
    return paths


def load_ca(directory: Path) -> tuple[KeyPair, ec.EllipticCurvePrivateKey]:
    """The CA `write_pki` wrote into `directory`, to sign more certificates later (the real nodes' identities)."""
    cert_pem = (directory / "ca.crt").read_bytes()
    key_pem = (directory / "ca.key").read_bytes()
    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{directory / 'ca.key'}: not an EC key")
    return KeyPair(cert_pem, key_pem), key


def write_client_cert(directory: Path, name: str, user: str, groups: tuple[str, ...]) -> KeyPair:
    """Sign a client certificate for `user` (in `groups`) with the CA in `directory`; write `<name>.crt/.key`."""
    ca, ca_key = load_ca(directory)
    pair = make_client_cert(ca, ca_key, user, groups)
    (directory / f"{name}.crt").write_bytes(pair.cert_pem)
    key_path = directory / f"{name}.key"
    key_path.write_bytes(pair.key_pem)
    key_path.chmod(0o600)
    return pair
