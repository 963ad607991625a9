"""The Ansible inventory derived from a farm: groups per service, département and wave.

The same structure feeds the inventory plugin (plugins/inventory/entfarm_farm.py, used by
``ansible-inventory`` and AWX) and ``entfarm inventory --list``; it is plain data so that it can
also be rendered as JSON for a static inventory.
"""

from __future__ import annotations

from typing import Any

from .model import SCHOOL_SERVER_GROUP, SERVICE_CATALOGUE, Farm

CENTRAL_GROUP = "central"


def departement_group(code: str) -> str:
    return f"departement_{code.lower()}"


def wave_group(wave_id: str) -> str:
    return f"wave_{wave_id}"


def etablissement_group(uai: str) -> str:
    return f"etab_{uai.lower()}"


def farm_vars(farm: Farm) -> dict[str, Any]:
    """Variables of the group ``all``: the model, for every role to read."""
    spec = farm.spec
    services = {}
    for name, placement in spec.services.items():
        services[name] = {
            "hosts": list(placement.hosts),
            "replicas": list(placement.replicas),
            "public_names": farm.public_names(name),
            "port": SERVICE_CATALOGUE[name].backend_port,
        }
    return {
        "entfarm_farm_name": spec.farm.name,
        "entfarm_farm_kind": spec.farm.kind,
        "entfarm_domain": spec.farm.domain,
        "entfarm_timezone": spec.farm.timezone,
        "entfarm_locale": spec.farm.locale,
        "entfarm_ntp_servers": list(spec.farm.ntp_servers),
        "entfarm_apt_mirror": spec.farm.apt_mirror,
        "entfarm_retention_months": spec.farm.retention_months,
        "entfarm_proxy_log_retention_days": spec.farm.proxy_log_retention_days,
        "entfarm_academie": spec.academie.model_dump(),
        "entfarm_departements": [d.model_dump() for d in spec.departements],
        "entfarm_waves": [w.model_dump() for w in spec.waves],
        "entfarm_etablissements": [e.model_dump() for e in spec.etablissements],
        "entfarm_services": services,
        "entfarm_public_services": farm.public_services(),
        "entfarm_public_names": farm.all_public_names(),
        "entfarm_versions": dict(spec.versions),
        # The portal's tiles (URLs resolved) and the branding of its generic name.
        "entfarm_portal": {
            "branding": farm.portal_branding().model_dump(),
            "tiles": farm.portal_tiles(),
        },
        "entfarm_artifacts": {
            "store": str((farm.inventory_dir / spec.artifacts.store).resolve()),
            "mirror": spec.artifacts.mirror,
            "sources": {k: v.model_dump() for k, v in spec.artifacts.sources.items()},
            **artifacts_vars(farm),
        },
        # Port users reach HTTPS on: 443, or the lab's published port on 127.0.0.1.
        "entfarm_public_https_port": farm.public_https_port,
        "entfarm_inventory_dir": str(farm.inventory_dir.resolve()),
        "entfarm_secrets_dir": str(farm.secrets_dir.resolve()),
        "entfarm_state_dir": str(farm.state_dir.resolve()),
    }


def artifacts_vars(farm: Farm) -> dict[str, Any]:
    """What playbooks/artifacts.yml checks before a deploy: the manifest, and per required
    artifact its kind, the command that produces it and, for a release, its file and the sha256
    from farm.yml (a built artifact's files and checksums are in the manifest)."""
    from .artifacts import MANIFEST, Store, command, kind_of, required_artifacts, source_file

    required = []
    for name in required_artifacts(farm):
        kind = kind_of(farm, name)
        item: dict[str, Any] = {"name": name, "kind": kind, "file": None, "sha256": None,
                                "fix": command(farm, "fetch" if kind == "fetched" else "build",
                                               name)}
        if kind == "fetched":
            source = farm.spec.artifacts.sources[name]
            item.update(file=source_file(name, source.url), sha256=source.sha256)
        required.append(item)
    return {"manifest": str((Store(farm).root / MANIFEST).resolve()), "required": required}


def host_vars(farm: Farm) -> dict[str, dict[str, Any]]:
    public = farm.public_services()
    out: dict[str, dict[str, Any]] = {}
    etabs = {e.uai: e for e in farm.spec.etablissements}
    for host in farm.hosts():
        hv: dict[str, Any] = {
            "entfarm_host_services": list(host.services),
            "ansible_python_interpreter": "/usr/bin/python3",
        }
        # Names this host answers for: the edge terminates every public name.
        names: list[str] = []
        for service in host.services:
            if service == "proxy":
                names += farm.all_public_names()
            elif service in public:
                names += public[service]["names"]
        hv["entfarm_host_public_names"] = list(dict.fromkeys(names))
        if host.etablissement:
            etab = etabs[host.etablissement]
            hv["entfarm_etablissement"] = etab.model_dump()
            if etab.lan is not None:
                net = etab.lan.network()
                first, last = etab.lan.leases()
                hv["entfarm_school_lan"] = {
                    "subnet": str(net), "netmask": str(net.netmask), "prefix": net.prefixlen,
                    "address": etab.lan.server_address(), "router": etab.lan.router,
                    "dhcp_start": first, "dhcp_end": last,
                }
        # Address other hosts use to reach this one on the farm network (lab: Docker DNS alias).
        hv["entfarm_address"] = host.name if farm.kind == "lab" else (host.address or host.name)
        reach = farm.reach(host)
        if reach.connection == "docker":
            hv["ansible_connection"] = "community.docker.docker"
        hv["ansible_host"] = reach.target
        hv["ansible_user"] = reach.user
        if reach.user != "root":
            hv["ansible_become"] = True
        out[host.name] = hv
    return out


def groups(farm: Farm) -> dict[str, dict[str, Any]]:
    """Group name -> {'hosts': [...], 'vars': {...}} (children are not needed: groups are flat)."""
    result: dict[str, dict[str, Any]] = {}

    def add(group: str, host: str | None = None, group_vars: dict[str, Any] | None = None) -> None:
        entry = result.setdefault(group, {"hosts": [], "vars": {}})
        if host and host not in entry["hosts"]:
            entry["hosts"].append(host)
        if group_vars:
            entry["vars"].update(group_vars)

    for service in SERVICE_CATALOGUE:
        add(service)
    add(SCHOOL_SERVER_GROUP)
    add(CENTRAL_GROUP)
    for dep in farm.spec.departements:
        add(departement_group(dep.code), group_vars={"entfarm_departement": dep.model_dump()})
    for wave in farm.spec.waves:
        uais = [e.uai for e in farm.etablissements_of_wave(wave.id)]
        add(wave_group(wave.id), group_vars={
            "entfarm_wave": wave.model_dump(), "entfarm_wave_etablissements": uais})
    for etab in farm.spec.etablissements:
        add(etablissement_group(etab.uai), group_vars={"entfarm_etablissement": etab.model_dump()})

    etabs = {e.uai: e for e in farm.spec.etablissements}
    for host in farm.hosts():
        for service in host.services:
            add(service, host.name)
        if host.etablissement:
            etab = etabs[host.etablissement]
            add(departement_group(etab.departement), host.name)
            add(wave_group(etab.wave), host.name)
            add(etablissement_group(etab.uai), host.name)
        else:
            add(CENTRAL_GROUP, host.name)
    return result


def as_json_inventory(farm: Farm) -> dict[str, Any]:
    """The ``ansible-inventory --list`` shape, for a static export or a script inventory."""
    grp = groups(farm)
    inv: dict[str, Any] = {
        "_meta": {"hostvars": host_vars(farm)},
        "all": {"children": ["ungrouped", *grp], "vars": farm_vars(farm)},
    }
    for name, entry in grp.items():
        inv[name] = {"hosts": entry["hosts"], "vars": entry["vars"]}
    return inv
