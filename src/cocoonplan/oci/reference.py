"""OCI references (``host/repository:tag@digest``), parsed the way the distribution grammar reads them."""

from __future__ import annotations

import re

from cocoonplan.errors import ReferenceFormatError
from cocoonplan.model import DIGEST_PATTERN, Model

DOCKER_HUB = "docker.io"
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_HOST = re.compile(r"^[A-Za-z0-9.-]+(?::[0-9]+)?$|^\[[0-9a-fA-F:]+\](?::[0-9]+)?$")
_DIGEST = re.compile(DIGEST_PATTERN)


class Reference(Model):
    """A parsed OCI reference; ``tag`` is only a label, ``digest`` (when known) decides."""

    registry: str
    """Registry host, with port when given (``ghcr.io``, ``127.0.0.1:5000``)."""
    repository: str
    """Repository path inside the registry (``cocoonstack/cocoon/ubuntu``)."""
    tag: str | None = None
    """The tag as written, if any."""
    digest: str | None = None
    """The manifest digest as written, if any."""

    @property
    def name(self) -> str:
        """``registry/repository``: the repository a blob is fetched from."""
        return f"{self.registry}/{self.repository}"

    def with_digest(self, digest: str) -> Reference:
        """Return this reference pinned to ``digest``, keeping the tag as a label."""
        return self.model_copy(update={"digest": digest})

    @property
    def selector(self) -> str:
        """What to ask the registry for: the digest when pinned, else the tag."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        text = self.name
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def parse_reference(text: str) -> Reference:
    """Parse ``text`` into a :class:`Reference`.

    A first path component is a registry host when it holds a ``.`` or ``:`` or is
    ``localhost``; otherwise the reference is on Docker Hub, where one-component names get
    ``library/``. A reference with neither tag nor digest means ``latest``.
    """
    original = text
    text = text.strip()
    digest: str | None = None
    if "@" in text:
        text, digest = text.split("@", 1)
        if not _DIGEST.fullmatch(digest):
            raise ReferenceFormatError(
                f"reference {original!r} has an invalid digest {digest!r}",
                hint="a digest is sha256: followed by 64 lower-case hex characters",
            )
    tag: str | None = None
    slash = text.rfind("/")
    colon = text.rfind(":")
    if colon > slash:
        text, tag = text[:colon], text[colon + 1 :]
        if not _TAG.fullmatch(tag):
            raise ReferenceFormatError(f"reference {original!r} has an invalid tag {tag!r}")
    first, _, rest = text.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        registry, repository = first, rest
    else:
        registry, repository = DOCKER_HUB, text
        if "/" not in repository:
            repository = f"library/{repository}"
    if not _HOST.fullmatch(registry) or not _REPOSITORY.fullmatch(repository):
        raise ReferenceFormatError(
            f"reference {original!r} is not a valid OCI reference",
            hint="write host/repository:tag or host/repository@sha256:<hex>, repository in lower case",
        )
    if tag is None and digest is None:
        tag = "latest"
    return Reference(registry=registry, repository=repository, tag=tag, digest=digest)
