"""A real OpenLDAP server (Debian's ``slapd``) on free loopback ports, for directory tests.

``Slapd`` writes a ``slapd.conf`` (mdb backend, the core/cosine/inetorgperson/nis schemas,
the memberof overlay, ACLs that keep anonymous sessions out) in a temporary folder, starts
``slapd`` in the foreground, waits until it answers (polling, with a deadline) and loads
an organisation:

    dc=example,dc=org
      ou=services: cn=triage (the service account that searches)
      ou=people:   alice (radiologists), root (triage-admins), eve (no group),
                   pat (a DN full of filter metacharacters; reporting),
                   a user whose uid is ``alice)(uid=*`` (no group)
      ou=groups:   cn=radiologists (groupOfNames: its members get memberOf),
                   cn=triage-admins, cn=reporting (groupOfUniqueNames: found by a group
                   search only)

Passwords are stored as {SSHA} hashes, like a real directory's.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ldap3 import MODIFY_ADD, MODIFY_DELETE, MODIFY_REPLACE, Connection, Server

SLAPD = Path("/usr/sbin/slapd")
MODULE_PATH = Path("/usr/lib/ldap")
SCHEMA_DIR = Path("/etc/ldap/schema")
SCHEMAS = ("core", "cosine", "inetorgperson", "nis")

SUFFIX = "dc=example,dc=org"
ROOT_DN = f"cn=admin,{SUFFIX}"
ROOT_PASSWORD = "root-of-the-test-directory"
PEOPLE = f"ou=people,{SUFFIX}"
GROUPS = f"ou=groups,{SUFFIX}"
SERVICE_DN = f"cn=triage,ou=services,{SUFFIX}"
SERVICE_PASSWORD = "service account secret"
RADIOLOGISTS = f"cn=radiologists,{GROUPS}"
ADMINS = f"cn=triage-admins,{GROUPS}"
REPORTING = f"cn=reporting,{GROUPS}"
NOBODY = f"cn=nobody,{SUFFIX}"  # a group keeps one member: groupOfNames needs one

ALICE_PASSWORD = "alice's directory password"
ROOT_USER_PASSWORD = "root's directory password"
EVE_PASSWORD = "eve's directory password"
PAT_PASSWORD = "pat's directory password"
INJECTOR_UID = "alice)(uid=*"
INJECTOR_PASSWORD = "injector's directory password"
PAT_DN = f"cn=Pat O*Brien (Radiology)\\, MD,{PEOPLE}"
INJECTOR_DN = f"cn=Injector,{PEOPLE}"


def slapd_problem() -> str | None:
    """Why no slapd can run here, or None."""
    if not SLAPD.is_file():
        return f"{SLAPD} is absent (apt-get install slapd ldap-utils)"
    if not (MODULE_PATH / "back_mdb.la").exists() and not (MODULE_PATH / "back_mdb.so").exists():
        return f"slapd's mdb backend is not installed under {MODULE_PATH}"
    return None


def ssha(password: str) -> str:
    """An OpenLDAP {SSHA} userPassword value."""
    salt = os.urandom(8)
    digest = hashlib.sha1(password.encode() + salt).digest()
    return "{SSHA}" + base64.b64encode(digest + salt).decode()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _can_bind(host: str) -> bool:
    try:
        free_port(host)
    except OSError:
        return False
    return True


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path


class Slapd:
    """One slapd process. ``url`` is its ldap:// listener; with ``tls``, ``ldaps_url`` and
    ``ldaps_other_url`` (the same listener port on 127.0.0.2, a name the certificate does not
    hold) too."""

    def __init__(self, workdir: Path, *, tls: TlsFiles | None = None) -> None:
        self.workdir = workdir
        self.tls = tls
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.ldaps_port = 0
        self.log_path = workdir / "slapd.log"
        self.has_other_host = _can_bind("127.0.0.2")

    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    @property
    def ldaps_url(self) -> str:
        return f"ldaps://127.0.0.1:{self.ldaps_port}"

    @property
    def ldaps_other_url(self) -> str:
        return f"ldaps://127.0.0.2:{self.ldaps_port}"

    def _config(self) -> Path:
        db_dir = self.workdir / "db"
        db_dir.mkdir(exist_ok=True)
        lines = [f"include {SCHEMA_DIR / name}.schema" for name in SCHEMAS]
        lines += [
            f"modulepath {MODULE_PATH}",
            "moduleload back_mdb",
            "moduleload memberof",
            f"pidfile {self.workdir / 'slapd.pid'}",
            f"argsfile {self.workdir / 'slapd.args'}",
        ]
        if self.tls:
            lines += [
                f"TLSCACertificateFile {self.tls.ca}",
                f"TLSCertificateFile {self.tls.cert}",
                f"TLSCertificateKeyFile {self.tls.key}",
            ]
        lines += [
            "database mdb",
            "maxsize 16777216",
            f'suffix "{SUFFIX}"',
            f'rootdn "{ROOT_DN}"',
            f'rootpw "{ROOT_PASSWORD}"',
            f"directory {db_dir}",
            "overlay memberof",
            "access to attrs=userPassword",
            "  by anonymous auth",
            "  by self write",
            "  by * none",
            "access to *",
            "  by users read",
            "  by * none",
        ]
        path = self.workdir / "slapd.conf"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start(self, *, deadline_s: float = 20.0) -> None:
        config = self._config()
        for _attempt in range(3):  # a port taken between choosing and binding: choose again
            self.port = free_port()
            urls = [f"ldap://127.0.0.1:{self.port}/"]
            if self.tls:
                self.ldaps_port = free_port()
                urls += [f"ldaps://127.0.0.1:{self.ldaps_port}/"]
                if self.has_other_host:
                    urls += [f"ldaps://127.0.0.2:{self.ldaps_port}/"]
            with self.log_path.open("wb") as log:
                self.proc = subprocess.Popen(
                    [str(SLAPD), "-d", "0", "-f", str(config), "-h", " ".join(urls)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            if self._wait_ready(time.monotonic() + deadline_s):
                self._load()
                return
        raise RuntimeError(f"slapd did not start; its log:\n{self.log_text()}")

    def _wait_ready(self, deadline: float) -> bool:
        """Poll until slapd answers a search (True) or exits (False); past the deadline, stop it
        and fail."""
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    pass
                conn = self.admin()
                conn.unbind()
                return True
            except OSError:
                time.sleep(0.05)  # polling interval, not synchronisation
            except Exception:  # ldap3 errors while slapd finishes starting
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"slapd did not answer within the deadline; its log:\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def admin(self) -> Connection:
        """A connection bound as the directory's root DN (to change entries in tests)."""
        server = Server("127.0.0.1", port=self.port, get_info="NO_INFO", connect_timeout=2)
        return Connection(
            server, ROOT_DN, ROOT_PASSWORD, auto_bind=True, receive_timeout=5, raise_exceptions=True
        )

    def add(self, dn: str, object_class: Sequence[str], **attributes: object) -> None:
        conn = self.admin()
        try:
            conn.add(dn, list(object_class), attributes)
        finally:
            conn.unbind()

    def add_user(self, uid: str, password: str, cn: str, *, dn: str | None = None) -> str:
        dn = dn or f"uid={uid},{PEOPLE}"
        self.add(
            dn,
            ["inetOrgPerson"],
            uid=uid,
            cn=cn,
            sn=cn.split()[-1],
            displayName=cn,
            userPassword=ssha(password),
        )
        return dn

    def add_group(self, cn: str, members: Sequence[str], *, unique: bool = False) -> str:
        dn = f"cn={cn},{GROUPS}"
        if unique:
            self.add(dn, ["groupOfUniqueNames"], cn=cn, uniqueMember=[NOBODY, *members])
        else:
            self.add(dn, ["groupOfNames"], cn=cn, member=[NOBODY, *members])
        return dn

    def set_membership(self, group_dn: str, member_dn: str, present: bool) -> None:
        attribute = "uniqueMember" if "groupofuniquenames" in self._classes(group_dn) else "member"
        conn = self.admin()
        try:
            conn.modify(
                group_dn, {attribute: [(MODIFY_ADD if present else MODIFY_DELETE, [member_dn])]}
            )
        finally:
            conn.unbind()

    def replace(self, dn: str, attribute: str, values: Sequence[str]) -> None:
        conn = self.admin()
        try:
            conn.modify(dn, {attribute: [(MODIFY_REPLACE, list(values))]})
        finally:
            conn.unbind()

    def _classes(self, dn: str) -> set[str]:
        conn = self.admin()
        try:
            conn.search(dn, "(objectClass=*)", search_scope="BASE", attributes=["objectClass"])
            return {str(c).lower() for c in conn.entries[0].objectClass.values}
        finally:
            conn.unbind()

    def delete(self, *dns: str) -> None:
        conn = self.admin()
        try:
            for dn in dns:
                conn.raise_exceptions = False
                conn.delete(dn)
        finally:
            conn.unbind()

    def unique_name(self, prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex[:8]}"

    def _load(self) -> None:
        self.add(SUFFIX, ["dcObject", "organization"], dc="example", o="Example Hospital")
        for ou in ("people", "groups", "services"):
            self.add(f"ou={ou},{SUFFIX}", ["organizationalUnit"], ou=ou)
        self.add(
            SERVICE_DN,
            ["applicationProcess", "simpleSecurityObject"],
            cn="triage",
            userPassword=ssha(SERVICE_PASSWORD),
        )
        alice = self.add_user("alice", ALICE_PASSWORD, "Alice Liddell")
        root = self.add_user("root", ROOT_USER_PASSWORD, "Root Admin")
        self.add_user("eve", EVE_PASSWORD, "Eve Nogroup")
        pat = self.add_user("pat", PAT_PASSWORD, "Pat O'Brien", dn=PAT_DN)
        self.add_user(INJECTOR_UID, INJECTOR_PASSWORD, "Injector", dn=INJECTOR_DN)
        self.add(RADIOLOGISTS, ["groupOfNames"], cn="radiologists", member=[alice])
        self.add(ADMINS, ["groupOfUniqueNames"], cn="triage-admins", uniqueMember=[root])
        self.add(REPORTING, ["groupOfUniqueNames"], cn="reporting", uniqueMember=[pat])


def running_slapd(workdir: Path, *, tls: TlsFiles | None = None) -> Iterator[Slapd]:
    """A started, loaded slapd for a ``with``-less fixture: yields it, stops it after."""
    server = Slapd(workdir, tls=tls)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir / "db", ignore_errors=True)
