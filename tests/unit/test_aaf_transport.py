"""The transport that runs the directory tools: compressed output, and failures that say which
tool failed, its exit status and what it wrote on stderr, with or without compression."""

from __future__ import annotations

import pytest

from entfarm.aaf.transport import LocalTransport, TransportError
from entfarm.errors import UserError

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


def _fail(error: Exception) -> None:
    raise error


class _Unpicklable(UserError):
    def __init__(self, message: str, extra: int):
        super().__init__(message)
        self.extra = extra


def test_a_user_error_in_a_forked_child_comes_back_as_itself() -> None:
    """A directory search run in a forked child (the people's state) that fails must reach
    the CLI as the same clear error, not as a worker's traceback."""
    from entfarm.aaf import forked

    failed = TransportError("ldapsearch failed on local (exit 49): Invalid credentials", 49)
    with pytest.raises(TransportError) as err:
        forked.Forked(_fail, failed).result()
    assert str(err.value) == str(failed) and err.value.returncode == 49
    with pytest.raises(UserError, match=r"^the directory has no entry"):
        forked.Forked(_fail, UserError("the directory has no entry dc=x")).result()
    # An error that does not survive pickling comes back as an internal error, with the
    # child's traceback.
    with pytest.raises(RuntimeError, match=r"(?s)forked worker .* failed:.*_Unpicklable"):
        forked.Forked(_fail, _Unpicklable("lost", 1)).result()
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        forked.Forked(_fail, ZeroDivisionError("internal")).result()
