"""Each kind of mistake in farm.yml, injected into a copy of the lab farm, is reported precisely:
the file, the YAML path, the bad value, what would be valid, the line, and only once."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from entfarm.errors import ValidationFailed
from entfarm.model import load_farm

if TYPE_CHECKING:
    from conftest import FarmCopy

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Case:
    old: str  # text of the lab farm.yml to replace (occurs once)
    new: str
    path: str  # YAML path the problem must name
    value: str  # the bad value, as the message must show it
    hint: str  # part of the message telling what would be valid
    line_needle: str  # the problem's line is the line holding this text (after the edit)


CASES: dict[str, Case] = {
    "uai check letter": Case(
        "uai: 0360010R", "uai: 0360010A", "etablissements[1].uai", "0360010A",
        "would be 0360010R", "uai: 0360010A"),
    "uai shape": Case(
        "uai: 0360010R", "uai: 036001R", "etablissements[1].uai", "036001R",
        "7 digits then a check letter", "uai: 036001R"),
    "uai lower case": Case(
        "uai: 0360005K", "uai: 0360005k", "etablissements[0].uai", "0360005k",
        "upper case (0360005K)", "uai: 0360005k"),
    "uai without check letter": Case(
        "uai: 0450022E", 'uai: "0450022"', "etablissements[2].uai", "0450022",
        "would be 0450022E", 'uai: "0450022"'),
    "duplicate uai": Case(
        "uai: 0360010R", "uai: 0360005K  # dup", "etablissements[1].uai", "0360005K",
        "already used by etablissements[0]", "0360005K  # dup"),
    "unknown departement": Case(
        'departement: "045"\n    wave: "1"', 'departement: "041"\n    wave: "1"',
        "etablissements[2].departement", "'041'", "declared under departements: 036, 045",
        'departement: "041"'),
    "departement not matching the uai": Case(
        'departement: "036"\n    wave: "2"', 'departement: "045"  # moved\n    wave: "2"',
        "etablissements[1].departement", "'045'", 'expected departement: "036"',
        '"045"  # moved'),
    "unknown wave": Case(
        'wave: "2"\n    school_server: false', 'wave: "3"\n    school_server: false',
        "etablissements[1].wave", "'3'", "declared under waves: 1, 2", 'wave: "3"'),
    "service on undeclared host": Case(
        "  etherpad:\n    hosts: [apps]", "  etherpad:\n    hosts: [app]",
        "services.etherpad.hosts[0]", "'app'", "did you mean 'apps'?", "hosts: [app]"),
    "host name not a DNS label": Case(
        "  - name: data", "  - name: Data_1", "hosts[2].name", "Data_1",
        "DNS label", "name: Data_1"),
    "unknown key": Case(
        "    school_server: false\n  - uai: 0450022E",
        "    school_sever: false\n  - uai: 0450022E",
        "etablissements[1].school_sever", "'school_sever'", "did you mean 'school_server'?",
        "school_sever"),
    "unknown top-level key": Case(
        "versions:", "version:", "version", "'version'", "did you mean 'versions'?",
        "version:"),
    "departement code read as octal": Case(
        'departement: "036"\n    wave: "2"', 'departement: 036\n    wave: "2"',
        "etablissements[1].departement", "036", 'octal number 30, not as written: quote it ("036")',
        "departement: 036"),
    "wrong type": Case(
        "canary: 1\n    failure_threshold: 0.25", "canary: some\n    failure_threshold: 0.25",
        "waves[0].canary", "'some'", "expected a whole number", "canary: some"),
    "out of bounds": Case(
        "failure_threshold: 0.25", "failure_threshold: 25", "waves[0].failure_threshold", "25",
        "must be at most 1", "failure_threshold: 25"),
    "missing required key": Case(
        "  domain: ent.test", "  # domain removed", "farm.domain", "'domain'",
        "required key", "farm:"),
    "duplicate departement": Case(
        'code: "045"', 'code: "036"  # dup', "departements[1].code", "'036'",
        "already declared at departements[0]", 'code: "036"  # dup'),
    "duplicate wave": Case(
        'id: "2"', 'id: "1"  # dup', "waves[1].id", "'1'", "already declared at waves[0]",
        'id: "1"  # dup'),
    "duplicate host": Case(
        "  - name: portal-2", "  - name: portal-1  # dup", "hosts[5].name", "'portal-1'",
        "already declared at hosts[4]", "portal-1  # dup"),
    "unknown service": Case(
        "  etherpad:\n", "  etherpd:\n", "services.etherpd", "'etherpd'",
        "did you mean 'etherpad'?", "etherpd:"),
    "duplicate key": Case(
        "  name: lab\n", "  name: lab\n  name: lab2\n", "farm.name", "'name'",
        "keep one", "name: lab2"),
    "boolean where text is expected": Case(
        "    name: Loiret", "    name: no", "departements[1].name", "no",
        'quote it ("no")', "name: no"),
    "list where a mapping is expected": Case(
        "  - name: edge", "  - edge", "hosts[0]", "mapping", "write: - name: edge", "- edge"),
    "null section": Case(
        'versions:\n  debian: "12"', "versions:", "versions", "null", "expected a mapping",
        "versions:"),
    "unknown portal profile": Case(
        "      profiles: [eleve, parent, enseignant, direction]",
        "      profiles: [eleve, parents, enseignant, direction]",
        "portal.tiles[0].profiles[1]", "parents", "did you mean 'parent'?",
        "profiles: [eleve, parents"),
    "tile without url for a service without public name": Case(
        "    - id: etherpad\n", "    - id: monitoring\n", "portal.tiles[2].id", "'monitoring'",
        "set url: https://", "- id: monitoring"),
    "duplicate tile": Case(
        "    - id: nextcloud\n", "    - id: moodle  # dup\n", "portal.tiles[1].id", "'moodle'",
        "already declared at portal.tiles[0]", "moodle  # dup"),
    "public name used twice": Case(
        "  etherpad:\n    hosts: [apps]", "  etherpad:\n    hosts: [apps]\n    public_name: cloud",
        "services.etherpad.public_name", "'cloud.ent.test'", "each public name serves one",
        "public_name: cloud"),
    "school lan not private": Case(
        "subnet: 10.45.40.0/24", "subnet: 100.64.0.0/24", "etablissements[3].lan.subnet",
        "100.64.0.0/24", "a school LAN is a private network", "subnet: 100.64.0.0/24"),
    "school lan with host bits": Case(
        "subnet: 10.45.40.0/24", "subnet: 10.45.40.1/24", "etablissements[3].lan.subnet",
        "10.45.40.1/24", "no host bits set", "subnet: 10.45.40.1/24"),
    "school lans overlap": Case(
        "subnet: 10.45.40.0/24", "subnet: 10.36.0.0/16", "etablissements[3].lan.subnet",
        "10.36.0.0/16", "the LAN of etablissements[0]", "subnet: 10.36.0.0/16"),
    "school lan overlaps the lab network": Case(
        "subnet: 10.45.40.0/24", "subnet: 172.30.0.128/25", "etablissements[3].lan.subnet",
        "172.30.0.0/24 (the lab network)", "change lab.subnet or the LAN",
        "subnet: 172.30.0.128/25"),
    "lab network overlaps a school lan": Case(
        "  network: entfarm-lab\n", "  network: entfarm-lab\n  subnet: 10.36.0.0/16\n",
        "lab.subnet", "overlaps 10.36.5.0/24", "the LAN of etablissements[0]",
        "subnet: 10.36.0.0/16"),
    "lab network too small": Case(
        "  network: entfarm-lab\n", "  network: entfarm-lab\n  subnet: 172.30.0.0/27\n",
        "lab.subnet", "172.30.0.0/27", "expected a prefix from /16 to /26",
        "subnet: 172.30.0.0/27"),
    "school server address outside its lan": Case(
        "lan: {subnet: 10.45.40.0/24}", "lan: {subnet: 10.45.40.0/24, address: 10.45.41.1}",
        "etablissements[3].lan.address", "10.45.41.1", "expected one of 10.45.40.1 to "
        "10.45.40.254", "address: 10.45.41.1}"),
    "school server without lan": Case(
        "    school_server: true\n    lan: {subnet: 10.45.40.0/24}\n",
        "    school_server: true  # no lan\n", "etablissements[3].school_server", "true",
        "add lan: {subnet:", "school_server: true  # no lan"),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_each_mistake_is_located(lab_copy: FarmCopy, case: Case) -> None:
    lab_copy.replace(case.old, case.new)
    problems = lab_copy.problems()
    at_path = [p for p in problems if p.path == case.path]
    assert len(at_path) == 1, "\n".join(p.render() for p in problems)
    problem = at_path[0]
    assert problem.file == str(lab_copy.file)
    assert case.value in problem.message
    assert case.hint in problem.message
    assert problem.line == lab_copy.line_of(case.line_needle)
    assert problem.render().startswith(f"{lab_copy.file}:{problem.line}: {case.path}: ")


def test_one_mistake_one_problem(lab_copy: FarmCopy) -> None:
    # 036 unquoted is both the wrong type and an unknown département: reported once.
    lab_copy.replace('departement: "036"\n    wave: "2"', 'departement: 036\n    wave: "2"')
    assert len(lab_copy.problems()) == 1


def test_invalid_host_name_not_reported_again_where_used(lab_copy: FarmCopy) -> None:
    lab_copy.replace("  - name: edge", "  - name: Edge")
    lab_copy.replace("    hosts: [edge]", "    hosts: [Edge]")
    problems = lab_copy.problems()
    assert [p.path for p in problems] == ["hosts[0].name", "services.proxy.hosts[0]"]
    assert all("DNS label" in p.message for p in problems)


def test_yaml_syntax_error_names_the_line(lab_copy: FarmCopy) -> None:
    lab_copy.replace("  name: lab\n", "\tname: lab\n")
    (problem,) = lab_copy.problems()
    assert "YAML syntax error" in problem.message and "'\\t'" in problem.message
    assert problem.line == lab_copy.line_of("\tname: lab")


def test_merge_keys_may_be_overridden(lab_copy: FarmCopy) -> None:
    lab_copy.replace("lab:\n  network: entfarm-lab\n",
                     "lab: &lab\n  network: entfarm-lab\n")
    text = lab_copy.text.replace(
        "  etherpad:\n    hosts: [apps]",
        "  etherpad: &app\n    hosts: [apps]\n  moodle_:\n    <<: *app\n    hosts: [data]")
    lab_copy.file.write_text(text, encoding="utf-8")
    problems = lab_copy.problems()
    # The merged 'hosts' overridden by an own 'hosts' is not a duplicate key.
    assert [p.path for p in problems] == ["services.moodle_"]


@pytest.mark.parametrize(
    ("content", "expected", "line"),
    [
        ("", "the file is empty", None),
        ("# only a comment\n", "the file is empty", None),
        ("- farm\n", "got a list", 1),
        ("farm: [\n", "YAML syntax error", 2),
        (b"farm:\n  name: caf\xe9\n", "not UTF-8", 2),
        ("farm:\n  name: a\x07b\n", "U+0007", 2),
        ("a: &a [*a]\n", "recursive", 1),
        ("a: &a [1, 2]\n" + "".join(
            f"b{i}: &b{i} [{', '.join([f'*b{i - 1}' if i > 1 else '*a'] * 10)}]\n"
            for i in range(1, 7)), "more than 200000 YAML nodes", None),
        ("farm:\n  version: 2024-13-45\n", "not one", 2),
    ],
    ids=["empty", "comment only", "list", "syntax", "latin-1", "control char", "recursive alias",
         "alias bomb", "impossible date"],
)
def test_weird_documents_give_one_clear_problem(
    make_farm: Callable[[str | bytes], FarmCopy], content: str | bytes, expected: str,
    line: int | None,
) -> None:
    problems = make_farm(content).problems()
    matching = [p for p in problems if expected in p.message]
    assert len(matching) == 1, "\n".join(p.render() for p in problems)
    assert matching[0].line == line


def test_missing_farm_file(tmp_path: Path) -> None:
    with pytest.raises(ValidationFailed) as caught:
        load_farm(tmp_path)
    (problem,) = caught.value.problems
    assert "no farm.yml in this directory" in problem.message


def test_every_mistake_reported_at_once(lab_copy: FarmCopy) -> None:
    lab_copy.replace("uai: 0360010R", "uai: 0360010A")
    lab_copy.replace('departement: "045"\n    wave: "1"', 'departement: "041"\n    wave: "1"')
    lab_copy.replace("  etherpad:\n    hosts: [apps]", "  etherpad:\n    hosts: [app]")
    lab_copy.replace("  - name: data", "  - name: data\n  - name: Bad_Host")
    lab_copy.replace("  timezone: Europe/Paris", "  timezon: Europe/Paris")
    lab_copy.replace('wave: "2"\n    school_server: true', 'wave: "9"\n    school_server: true')
    problems = lab_copy.problems()
    expected = [
        ("farm.timezon", "timezon:"),
        ("etablissements[1].uai", "uai: 0360010A"),
        ("etablissements[2].departement", 'departement: "041"'),
        ("etablissements[3].wave", 'wave: "9"'),
        ("hosts[3].name", "Bad_Host"),
        ("services.etherpad.hosts[0]", "hosts: [app]"),
    ]
    assert [(p.path, p.line) for p in problems] == [
        (path, lab_copy.line_of(needle)) for path, needle in expected]


# -- the command line ---------------------------------------------------------------------

ENTFARM = Path(sys.executable).parent / "entfarm"
needs_cli = pytest.mark.skipif(
    not (REPO / "entfarm" / "cli.py").exists() or not ENTFARM.exists(),
    reason="entfarm.cli is not written yet",
)


def _validate(inventory: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}
    return subprocess.run(
        [str(ENTFARM), "validate", "-i", str(inventory)], capture_output=True, text=True,
        cwd=REPO, env=env, timeout=60, check=False)


@needs_cli
def test_cli_validate_reports_every_problem_with_exit_code_2(lab_copy: FarmCopy) -> None:
    lab_copy.replace("uai: 0360010R", "uai: 0360010A")
    lab_copy.replace('departement: "036"\n    wave: "2"', 'departement: 036\n    wave: "2"')
    result = _validate(lab_copy.dir)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = {p.render() for p in lab_copy.problems()}
    for line in lines:
        assert line in result.stderr


@needs_cli
def test_cli_validate_syntax_error_without_traceback(lab_copy: FarmCopy) -> None:
    lab_copy.replace("  name: lab\n", "  name: [lab\n")
    result = _validate(lab_copy.dir)
    assert result.returncode == 2
    assert "YAML syntax error" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


@needs_cli
def test_cli_validate_accepts_the_lab(lab_copy: FarmCopy) -> None:
    result = _validate(lab_copy.dir)
    assert result.returncode == 0, result.stderr


@needs_cli
def test_cli_prints_problems_verbatim(lab_copy: FarmCopy) -> None:
    # A problem on line 100 (":100:" is an emoji code to rich), whose message has brackets.
    lab_copy.replace("hosts: [portal-1, portal-2]", "hosts: [portal-1, portal-3]")
    shift = lab_copy.line_of("hosts: [portal-1, portal-3]") - 100
    assert shift >= 0
    text = lab_copy.file.read_text(encoding="utf-8").split("\n")
    lab_copy.file.write_text("\n".join(text[shift:]), encoding="utf-8")  # drop leading comments
    (problem,) = lab_copy.problems()
    assert problem.line == 100
    result = _validate(lab_copy.dir)
    assert problem.render() in result.stderr
