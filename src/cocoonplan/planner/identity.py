"""Who a VM is on its node: its ID and its NICs' TAP, MAC and address.

cocoon draws VM IDs and MACs at random, and the network backend assigns addresses, when a
VM is created. A plan must show exact paths and devices, so for a new VM (and for the new VM
of a replace) cocoonplan derives them from the node and VM name, keeping cocoon's shapes (26
base32 characters, a locally administered unicast MAC), and the plan marks every value that
depends on them as provisional; for a VM that stays, they are the node's.
"""

from __future__ import annotations

import base64
import hashlib

from cocoonplan.model import Model
from cocoonplan.observed import NicAddress, ObservedVM


class NicIdentity(Model):
    """One NIC as the hypervisor and the guest see it."""

    tap: str
    mac: str
    address: NicAddress | None = None
    """A static address (becomes an ``ip=`` kernel parameter); None for DHCP or unknown."""


class Identity(Model):
    """A VM's ID and NICs."""

    vm_id: str
    nics: tuple[NicIdentity, ...]


def planned_vm_id(node: str, name: str, draw: int = 0) -> str:
    """A cocoon-shaped VM ID (26 base32 characters), stable for a VM name on a node.

    ``draw`` gives another, equally plausible ID: two draws tell which planned values depend
    on the ID cocoon will really choose.
    """
    salt = f"/{draw}" if draw else ""
    digest = hashlib.sha256(f"cocoonplan/vm/{node}/{name}{salt}".encode()).digest()
    return base64.b32encode(digest).decode()[:26]


def planned_mac(vm_id: str, index: int) -> str:
    """A locally administered unicast MAC for NIC ``index`` of ``vm_id``."""
    raw = bytearray(hashlib.sha256(f"cocoonplan/mac/{vm_id}/{index}".encode()).digest()[:6])
    raw[0] = (raw[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in raw)


def tap_name(vm_id: str, index: int) -> str:
    """cocoon's CNI TAP device name (``tap`` + ID[:8] + ``-`` + NIC index)."""
    return f"tap{vm_id[:8]}-{index}"


def planned_nic(vm_id: str, index: int) -> NicIdentity:
    """A NIC cocoonplan names for a VM that does not run yet."""
    return NicIdentity(tap=tap_name(vm_id, index), mac=planned_mac(vm_id, index))


def fresh_identity(node: str, name: str, nic_count: int, draw: int = 0) -> Identity:
    """The identity a VM created now would get, as cocoonplan expects it: every value provisional."""
    vm_id = planned_vm_id(node, name, draw)
    return Identity(vm_id=vm_id, nics=tuple(planned_nic(vm_id, i) for i in range(nic_count)))


def kept_identity(running: ObservedVM, nic_count: int) -> Identity:
    """The identity of a VM that stays: its ID and NICs (TAP, MAC, address) as the node has them.

    NICs beyond the ones it has are derived (they would only exist after a replace).
    """
    kept = [NicIdentity(tap=n.tap, mac=n.mac, address=n.network) for n in running.nics[:nic_count]]
    kept += [planned_nic(running.id, i) for i in range(len(kept), nic_count)]
    return Identity(vm_id=running.id, nics=tuple(kept))
