"""The transport that runs the directory tools: compressed output, and failures that say which
tool failed, its exit status and what it wrote on stderr, with or without compression."""

from __future__ import annotations

import pytest

from entfarm.aaf.transport import LocalTransport, TransportError

TEXT = "".join(f"dn: uid=eleve{i},ou=people,dc=example\nENTPersonEtat: ACTIF\n\n"
               for i in range(20000))


@pytest.mark.parametrize("compress", [False, True])
def test_output_is_the_tools_output(compress: bool) -> None:
    t = LocalTransport()
    out = t.run(["cat"], stdin=TEXT.encode(), compress=compress)
    assert out == TEXT.encode()


@pytest.mark.parametrize("compress", [False, True])
def test_a_failing_tool_is_reported_with_its_status_and_stderr(compress: bool) -> None:
    t = LocalTransport()
    with pytest.raises(TransportError) as err:
        t.run(["sh", "-c", "echo partial; echo 'no such attribute' >&2; exit 17"],
              compress=compress)
    assert err.value.returncode == 17
    assert str(err.value) == "sh failed on local (exit 17): no such attribute"


@pytest.mark.parametrize("compress", [False, True])
def test_accepted_statuses_return_the_output(compress: bool) -> None:
    t = LocalTransport()
    out = t.run(["sh", "-c", "echo found nothing; exit 32"], ok=(0, 32), compress=compress)
    assert out == b"found nothing\n"
