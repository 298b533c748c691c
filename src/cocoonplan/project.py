"""The project file, ``cocoonplan.yaml``: where bytes come from and where nodes keep state.

Specs name canonical references (``ghcr.io/org/repo:tag``); only this file says whether
those bytes are read from the registry itself, a mirror endpoint or an OCI image layout
directory, and where each node's cocoon state is found.
"""

from __future__ import annotations

import re
from enum import StrEnum
from ipaddress import AddressValueError, IPv4Address
from typing import Literal

from pydantic import Field, StrictBool, field_validator, model_validator

from cocoonplan.cocoon import NETWORK_NAME, VCpus, normal_path
from cocoonplan.model import NAME_PATTERN, Model
from cocoonplan.releases import line_of

PROJECT_FILE = "cocoonplan.yaml"
LOCK_FILE = "cocoonplan.lock"


class RegistrySource(Model):
    """Where one registry host's content is read from; with neither field, the registry itself."""

    layout: str | None = None
    """An OCI image layout directory, relative to the project file."""
    mirror: str | None = None
    """Another registry endpoint (``http://127.0.0.1:5000``) serving the same repositories."""

    @model_validator(mode="after")
    def _one_source(self) -> RegistrySource:
        if self.layout is not None and self.mirror is not None:
            raise ValueError("give either layout or mirror, not both")
        return self


class Arch(StrEnum):
    """A node's CPU architecture; values are the OCI platform (Go ``GOARCH``) spellings."""

    AMD64 = "amd64"
    ARM64 = "arm64"


class HypervisorBuild(StrEnum):
    """A node's Cloud Hypervisor build; values are the wire strings."""

    UPSTREAM = "upstream"
    """A stock release: refuses ``memory_restore_mode: CopyOnWrite`` (cocoon's ``mmap``)."""
    COCOONSTACK = "cocoonstack"
    """cocoonstack's fork (``cocoon doctor --upgrade``): accepts ``CopyOnWrite``."""


class NodeConfig(Model):
    """One cocoon node: its settings and where its state can be read from here."""

    root_dir: str = Field(default="/var/lib/cocoon", alias="rootDir")
    """cocoon's ``--root-dir`` on the node; every planned path lies under it."""
    run_dir: str | None = Field(default=None, alias="runDir")
    """cocoon's ``--run-dir``; defaults to ``<rootDir>/run``."""
    state: str | None = None
    """Where to read the node's state from here: a cocoon root directory or an exported
    state document (relative to the project file). Without it the node is taken as empty."""
    arch: Arch = Arch.AMD64
    """The node's CPU architecture: cocoon pulls ``linux/<arch>`` from a multi-platform index."""
    cpus: VCpus
    """Host CPU count (required): cocoon launches with ``--cpus max=<host CPUs>``, pins queues by
    it, and refuses a VM with more vCPUs."""
    hugepages: StrictBool = False
    """Whether ``/proc/sys/vm/nr_hugepages`` is above 0 on the node (adds ``hugepages=on``)."""
    dns: tuple[str, ...] = ("8.8.8.8", "1.1.1.1")
    """cocoon's ``--dns`` setting: at most the two IPv4 addresses cocoon puts into static ``ip=``
    kernel parameters."""
    default_network: str | None = Field(default=None, alias="defaultNetwork", pattern=NETWORK_NAME)
    """The CNI conflist name cocoon records for a VM given no ``--network``; overrides
    ``cniConfDir`` and the state's ``default_network``."""
    cni_conf_dir: str | None = Field(default=None, alias="cniConfDir")
    """A copy of the node's ``--cni-conf-dir`` (relative to the project file), read with
    cocoon's rule to find the default network when ``defaultNetwork`` is not given."""
    cocoon_version: str | None = Field(default=None, alias="cocoonVersion")
    """The cocoon release the node runs (``cocoon version``); overrides the exported state's
    and what the root's layout shows."""
    cocoon: str = "cocoon"
    """The node's cocoon command for apply (a binary, with arguments if any, shell-quoted);
    the global flags ``--root-dir``, ``--run-dir`` and ``--dns`` follow from this node's settings."""
    cloud_hypervisor: HypervisorBuild | None = Field(default=None, alias="cloudHypervisor")
    """Which Cloud Hypervisor build the node runs: it decides whether cocoon's ``mmap`` restore
    works. Absent: the exported state's ``cloud_hypervisor``, else ``upstream``; when both say,
    they must agree."""

    @field_validator("cocoon_version")
    @classmethod
    def _known_version(cls, version: str | None) -> str | None:
        if version is not None:
            line_of(version)  # raises ValueError naming the version and the supported lines
        return version

    model_config = Model.model_config | {"populate_by_name": True}

    @field_validator("root_dir", "run_dir")
    @classmethod
    def _host_path(cls, path: str | None) -> str | None:
        # Every planned path and the launch line are built from these.
        return None if path is None else normal_path(path)

    @field_validator("dns")
    @classmethod
    def _dns_addresses(cls, dns: tuple[str, ...]) -> tuple[str, ...]:
        # Entries are copied into the kernel cmdline's ip= parameter, whose fields are
        # colon-separated IPv4 addresses: anything else would add parameters or fields.
        if len(dns) > 2:
            raise ValueError("cocoon uses the first two dns entries only; list at most two")
        for entry in dns:
            try:
                IPv4Address(entry)
            except AddressValueError as exc:
                raise ValueError(f"dns entry {entry!r} is not an IPv4 address") from exc
        return dns

    @property
    def effective_run_dir(self) -> str:
        """cocoon's run dir on the node."""
        return self.run_dir or f"{self.root_dir.rstrip('/')}/run"


class Project(Model):
    """The parsed ``cocoonplan.yaml``."""

    api_version: Literal["cocoonplan/v1alpha1"] = Field(default="cocoonplan/v1alpha1", alias="apiVersion")
    kind: Literal["Project"] = "Project"
    registries: dict[str, RegistrySource] = Field(default_factory=dict)
    """Registry host → where its content is read from; unlisted hosts are read from themselves."""
    insecure: tuple[str, ...] = ()
    """Registry hosts reached over plain HTTP; loopback hosts always are."""
    nodes: dict[str, NodeConfig] = Field(default_factory=dict)
    """Node name → node settings; a spec's ``node`` must name one of these."""
    cache: str = ".cocoonplan/cache"
    """Digest-addressed cache of manifests and blobs, relative to the project file."""

    @field_validator("nodes")
    @classmethod
    def _node_names(cls, nodes: dict[str, NodeConfig]) -> dict[str, NodeConfig]:
        # Node names become directory names (render --dir): keep them to cocoon's name syntax.
        bad = [name for name in nodes if not re.fullmatch(NAME_PATTERN, name)]
        if bad:
            raise ValueError(f"node name(s) {', '.join(map(repr, bad))} must match {NAME_PATTERN}")
        return nodes

    model_config = Model.model_config | {"populate_by_name": True}
