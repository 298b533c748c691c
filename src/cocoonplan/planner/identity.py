"""Identifiers cocoonplan assigns at plan time, derived from content so plans are reproducible.

cocoon draws VM IDs and MACs at random; a plan must show the exact paths and devices a VM
will have, so cocoonplan derives them from the node and VM name instead. They keep cocoon's
shapes: 26 characters of RFC 4648 base32 for an ID, a locally administered unicast MAC.
"""

from __future__ import annotations

import base64
import hashlib


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
