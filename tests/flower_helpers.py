"""Helpers of the tests that run real Flower deployments on 127.0.0.1: certificates and
SuperNode keys made here, processes, bounded waits."""

import datetime
import ipaddress
import os
import re
import signal
import sys
import time
from pathlib import Path


def alive(pid: int) -> bool:
    """``pid`` runs (a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def kill_group(pid: int) -> None:
    """SIGKILL the process group ``pid`` leads (a crashed machine: no cleanup of any kind)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def exit_status(proc) -> int | None:
    """``proc``'s exit status if it has exited on its own (negative: the signal that ended it),
    without reaping it: until it is reaped its pid, and so its process group, cannot be reused,
    and ``kill_group`` may still end what it left in its group."""
    info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    if info is None:
        return None
    return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


def wait_until(predicate, timeout: float, what: str, interval: float = 0.5, fail_fast=None):
    """Poll ``predicate`` until it returns something truthy (returned) or ``timeout`` seconds
    pass (AssertionError naming ``what``). ``fail_fast()`` may raise earlier (a process died)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if fail_fast is not None:
            fail_fast()
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def count_in(path: Path, pattern: str) -> int:
    """How many times ``pattern`` (a regex) occurs in the file (0 while it does not exist)."""
    try:
        return len(re.findall(pattern, Path(path).read_text(errors="replace")))
    except OSError:
        return 0


def make_tls(folder: Path):
    """A CA and a server certificate for 127.0.0.1 (EC P-256, valid for a day): what
    ``openssl req`` makes in docs/deployment.md, made with the ``cryptography`` package."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from fastseq.flower.deploy import TLSFiles

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fastseq test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    (folder / "ca.crt").write_bytes(ca.public_bytes(pem))
    (folder / "server.pem").write_bytes(cert.public_bytes(pem))
    (folder / "server.key").write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
    return TLSFiles(folder / "ca.crt", folder / "server.pem", folder / "server.key")


def make_supernode_key(path: Path) -> Path:
    """An EC P-384 key pair in OpenSSH format, as ``ssh-keygen -t ecdsa -b 384 -N "" -f PATH``
    writes it (``PATH`` and ``PATH.pub``); returns ``PATH``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    Path(str(path) + ".pub").write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                       serialization.PublicFormat.OpenSSH))
    return path


# A stock flower-supernode that declares a 10 s heartbeat (Flower's minimum) instead of its
# hard-wired 30 s, so that the SuperLink declares a killed SuperNode unavailable within ~20 s
# instead of ~60 s (HEARTBEAT_PATIENCE = 2 intervals). Nothing else differs. The launcher fails
# loudly if flwr moved the constants.
HEARTBEAT_S = 10
_FAST_HEARTBEAT = f"""
import sys
import flwr.supercore.heartbeat as sender
import flwr.supernode.fleet_http_connection as connection
for module in (sender, connection):
    assert hasattr(module, "HEARTBEAT_DEFAULT_INTERVAL"), module.__name__ + " has no HEARTBEAT_DEFAULT_INTERVAL"
    module.HEARTBEAT_DEFAULT_INTERVAL = {HEARTBEAT_S}
from flwr.supernode.cli import flower_supernode
sys.argv[0] = "flower-supernode"
sys.exit(flower_supernode())
"""
FAST_HEARTBEAT_SUPERNODE = [sys.executable, "-c", _FAST_HEARTBEAT]
