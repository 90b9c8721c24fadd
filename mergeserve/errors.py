"""The project's exception types.

Every error a user can cause is one of these. Each maps to a process exit code (for the CLI) and
an HTTP status (for the server), and each pickles cleanly so it survives a trip through a Ray
actor: Ray re-raises the original type on the driver, so `mergeserve merge` prints the same
one-line message whether the merge ran in-process or on a remote node.
"""

from __future__ import annotations

# A message quotes what the user gave (paths, tensor names, header values): a hostile file can make
# that arbitrarily long or put a terminal escape in it. What is shown is one line of at most this
# many characters, with control characters escaped.
MAX_MESSAGE = 2000


def one_line(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` as one printable line of at most ``limit`` characters."""
    text = text.replace("\r\n", " ").replace("\n", " ").replace("\r", " ").replace("\t", " ")
    if not text.isprintable():
        text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
    if len(text) > limit:
        more = f"... ({len(text) - limit} more characters)"
        text = text[: limit - len(more)] + more
    return text


class MergeServeError(Exception):
    """Base class. `str(err)` is the one-line message shown to the user (see :func:`one_line`)."""

    exit_code: int = 1
    http_status: int = 500

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __reduce__(self):  # keep subclasses with extra fields picklable
        return (self.__class__, (self.message,))

    def __str__(self) -> str:
        return one_line(self.message)


class ConfigError(MergeServeError):
    """The recipe (YAML) is invalid. Carries every problem found, each naming its field."""

    exit_code = 2
    http_status = 400

    def __init__(self, message: str, problems: list[str] | tuple[str, ...] = ()):
        self.problems = tuple(problems) or (message,)
        super().__init__(message)

    def __reduce__(self):
        return (self.__class__, (self.message, self.problems))

    @classmethod
    def from_problems(cls, problems: list[str], source: str = "config") -> ConfigError:
        head = f"{source}: {len(problems)} problem{'s' if len(problems) != 1 else ''}: "
        return cls(head + "; ".join(problems), problems)


class InputError(MergeServeError):
    """An input model is unreadable, corrupt, or does not match the others (names the file/tensor)."""

    exit_code = 2
    http_status = 400


class OutputExistsError(MergeServeError):
    """The destination exists and --overwrite was not given."""

    exit_code = 2
    http_status = 409


class ResourceError(MergeServeError):
    """Out of memory, disk full, or a worker died: names the shard that was being processed."""

    exit_code = 3
    http_status = 503


class ClusterError(MergeServeError):
    """The Ray cluster cannot be reached or refused the work."""

    exit_code = 4
    http_status = 503


class ResumeError(MergeServeError):
    """`--resume` found a partial run that does not match this config or these inputs."""

    exit_code = 2
    http_status = 409


class UnsupportedError(MergeServeError):
    """A valid request that this hardware or build cannot honour (e.g. FP8 on-load quantization)."""

    exit_code = 2
    http_status = 422


class EndpointError(MergeServeError):
    """The endpoint under load test cannot be reached, refuses our credentials, or does not serve
    the model asked for (``mergeserve loadtest``): found before any load is sent."""

    exit_code = 5
    http_status = 502
