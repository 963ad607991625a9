#!/usr/bin/python3
"""Accounts, groups and class shares of the school server, from its directory replica.

Reads the replica as root over ldapi:/// and writes, each file only when its content changes:
- /var/lib/extrausers/{passwd,group,shadow} (libnss-extrausers): one Unix account per person,
  uid and gid derived from ENTPersonJointure, so that a rebuilt server gives the same ids to the
  files restored from its backup;
- the Samba password database (smbpasswd format) from ENTPersonNTHash; deactivated accounts
  and accounts without a hash are disabled;
- the class shares (one per class: its pupils and its teachers) included by smb.conf;
- the proxy's lists: login -> NT hash for its authentication helper, and the pupils' logins.
Everything it needs is on this host: it runs the same while the farm is unreachable.
Prints one JSON line: what changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import ldap

STATE = Path("/var/lib/entfarm-school")
EXTRAUSERS = Path("/var/lib/extrausers")
CONFIG = Path("/etc/entfarm-school/accounts.json")
ATTRS = ["uid", "displayName", "ENTPersonJointure", "ENTPersonProfils", "ENTPersonEtat",
         "ENTPersonNTHash", "ENTEleveClasses", "ENTAuxEnsClasses"]
PUPIL = "National_ELV"
TEACHER = "National_ENS"
PARENT = "National_TUT"
LOGIN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,31}$")


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "x"


def stable_id(base: int, key: str, taken: set[int]) -> int:
    """An id from a digest of key, probing past ids already given on this server."""
    n = base + int(hashlib.sha256(key.encode()).hexdigest(), 16) % 100_000_000
    while n in taken:
        n += 1
    taken.add(n)
    return n


def write(path: Path, text: str, mode: int, group: int = 0) -> bool:
    """Replace path atomically when its content differs; True when it changed."""
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.chown(tmp, 0, group)
    os.chmod(tmp, mode)
    os.replace(tmp, path)
    return True


def read_people(base_dn: str, uai: str) -> tuple[list[dict[str, list[str]]], set[str]]:
    """The replica's people, and the AAF ids of the établissement (class values start with
    one: a teacher of two collèges has the classes of both)."""
    conn = ldap.initialize("ldapi:///")
    conn.sasl_non_interactive_bind_s("EXTERNAL")
    structures = conn.search_s(f"ou=structures,{base_dn}", ldap.SCOPE_ONELEVEL,
                               f"(ENTStructureUAI={uai})", ["ENTStructureJointure"])
    ids = {v.decode() for _dn, e in structures for v in e.get("ENTStructureJointure", [])}
    found = conn.search_s(f"ou=people,{base_dn}", ldap.SCOPE_ONELEVEL,
                          "(objectClass=ENTPerson)", ATTRS)
    people = []
    for _dn, entry in found:
        people.append({k: [v.decode() for v in vs] for k, vs in entry.items()})
    return people, ids


def classes_of(person: dict[str, list[str]], ids: set[str]) -> list[str]:
    """Classes of the person in this établissement: values <structure id>$<class>."""
    values = person.get("ENTEleveClasses", []) + person.get("ENTAuxEnsClasses", [])
    return sorted({v.split("$")[1] for v in values
                   if v.count("$") >= 1 and v.split("$")[0] in ids and v.split("$")[1]})


def main() -> int:
    config = json.loads(CONFIG.read_text(encoding="utf-8"))
    base, root = int(config["id_base"]), Path(config["share_root"])
    people, ids = read_people(config["base_dn"], config["uai"])
    taken: set[int] = set()
    groups: dict[str, list[str]] = {"eleves": [], "enseignants": [], "personnels": []}
    gids = {g: base - 10 + i for i, g in enumerate(groups)}
    class_names: dict[str, str] = {}
    passwd, shadow, smbpasswd, proxy_users, pupils = [], [], [], [], []
    # Last change time: a constant keeps the file stable (the directory knows the real one);
    # not zero, which Samba reads as "must change the password at next logon".
    lct = "LCT-5F5E1000"
    for person in sorted(people, key=lambda p: p.get("uid", [""])[0]):
        login = (person.get("uid") or [""])[0]
        profiles = person.get("ENTPersonProfils", [])
        if not LOGIN.match(login) or profiles == [PARENT]:
            continue  # parents do not use the school's workstations
        uid = stable_id(base, (person.get("ENTPersonJointure") or [login])[0], taken)
        primary = "eleves" if PUPIL in profiles else "personnels"
        groups[primary].append(login)
        if TEACHER in profiles:
            groups["enseignants"].append(login)
        for name in classes_of(person, ids):
            group = f"classe-{slug(name)}"
            class_names[group] = name
            groups.setdefault(group, []).append(login)
        gecos = (person.get("displayName") or [login])[0].replace(":", " ")
        passwd.append(f"{login}:x:{uid}:{gids[primary]}:{gecos}:{root}/homes/{login}:"
                      "/usr/sbin/nologin\n")
        shadow.append(f"{login}:*:19000:0:99999:7:::\n")
        nthash = (person.get("ENTPersonNTHash") or [""])[0].upper()
        active = (person.get("ENTPersonEtat") or ["ACTIF"])[0] != "DESACTIVE"
        usable = active and re.fullmatch(r"[0-9A-F]{32}", nthash) is not None
        flags = "[U          ]" if usable else "[DU         ]"
        smbpasswd.append(f"{login}:{uid}:{'X' * 32}:{nthash if usable else 'X' * 32}:"
                         f"{flags}:{lct}:\n")
        if usable:
            proxy_users.append(f"{login}:{nthash}\n")
            if primary == "eleves":
                pupils.append(f"{login}\n")
    for group in sorted(groups):
        if group not in gids:
            gids[group] = stable_id(base, "group:" + group, taken)
    group_lines = [f"{g}:x:{gids[g]}:{','.join(sorted(m))}\n" for g, m in sorted(groups.items())]

    changed = []
    proxy_gid = int(config.get("proxy_gid", 0))
    for path, text, mode, gid in (
        (EXTRAUSERS / "passwd", "".join(passwd), 0o644, 0),
        (EXTRAUSERS / "group", "".join(group_lines), 0o644, 0),
        (EXTRAUSERS / "shadow", "".join(shadow), 0o640, 0),
        (STATE / "smbpasswd", "".join(smbpasswd), 0o600, 0),
        (STATE / "squid" / "users", "".join(proxy_users), 0o640, proxy_gid),
        (STATE / "squid" / "eleves", "".join(pupils) or "-\n", 0o640, proxy_gid),
    ):
        if write(path, text, mode, gid):
            changed.append(str(path))

    shares = []
    for group in sorted(class_names):
        directory = root / "classes" / group.removeprefix("classe-")
        if not directory.is_dir():
            directory.mkdir(parents=True)
            changed.append(str(directory))
        os.chown(directory, 0, gids[group])
        os.chmod(directory, 0o2770)
        shares.append(f"[{group}]\n   comment = Classe {class_names[group]}\n"
                      f"   path = {directory}\n   valid users = @{group}\n"
                      f"   force group = {group}\n   read only = no\n"
                      "   create mask = 0660\n   directory mask = 2770\n\n")
    header = "# Written by entfarm-school-accounts from the directory replica: one share a class.\n"
    if write(Path("/etc/samba/entfarm-classes.conf"), header + "".join(shares), 0o644):
        changed.append("/etc/samba/entfarm-classes.conf")
    for line in passwd:
        login, _x, uid, gid = line.split(":")[:4]
        home = root / "homes" / login
        if not home.is_dir():
            home.mkdir(parents=True)
            os.chown(home, int(uid), int(gid))
            os.chmod(home, 0o700)
            changed.append(str(home))
    if any(c.endswith(("entfarm-classes.conf", "smbpasswd")) for c in changed):
        subprocess.run(["smbcontrol", "smbd", "reload-config"], check=False,
                       capture_output=True)
    if any("/squid/" in c for c in changed):
        subprocess.run(["squid", "-k", "reconfigure"], check=False, capture_output=True)
    print(json.dumps({"people": len(passwd), "classes": len(class_names),
                      "changed": len(changed), "files": changed[:20]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
