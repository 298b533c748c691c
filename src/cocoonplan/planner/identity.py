"""Who a VM is on its node: its ID and its NICs' TAP, MAC and address.

cocoon draws VM IDs and MACs at random, and the network backend assigns addresses, when a
VM is created. A plan must show exact paths and devices, so for a new VM cocoonplan derives
them from the node and VM name (keeping cocoon's shapes: 26 base32 characters, a locally
administered unicast MAC); for a VM that already runs, they are the node's.
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


def planned_vm_id(node: str, name: str) -> str:
    """A cocoon-shaped VM ID (26 base32 characters), stable for a VM name on a node."""
    digest = hashlib.sha256(f"cocoonplan/vm/{node}/{name}".encode()).digest()
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


def identity_for(node: str, name: str, nic_count: int, running: ObservedVM | None) -> Identity:
    """The running VM's identity when there is one, else a derived one.

    NICs the running VM has keep their TAP, MAC and address; NICs beyond them are derived.
    """
    if running is None:
        vm_id = planned_vm_id(node, name)
        return Identity(vm_id=vm_id, nics=tuple(planned_nic(vm_id, i) for i in range(nic_count)))
    kept = [NicIdentity(tap=n.tap, mac=n.mac, address=n.network) for n in running.nics[:nic_count]]
    kept += [planned_nic(running.id, i) for i in range(len(kept), nic_count)]
    return Identity(vm_id=running.id, nics=tuple(kept))
