"""The boot proof: cold-boot a VM's disk set in a throwaway QEMU microVM and read its root.

A plan lists digests and serials; only a boot shows that those disks, attached under those
serials and stacked in the order ``cocoon.layers=`` names, give the guest the root filesystem
its spec expects. The proof boots a stock Linux kernel with a small busybox initramfs whose
``/init`` assembles the root as cocoon's guest script ``cocoon-overlay`` does, then looks up
every path of the spec's ``expect`` inside that root and reports on the serial console.

- :mod:`.target` (pure): what one boot is made of, from a plan's VM or a node's VM record;
- :mod:`.initramfs` (pure): the guest program and the cpio archives that carry it;
- :mod:`.kernel`: the guest kernel (``vmlinux`` and modules from an unpacked linux-image);
- :mod:`.disks`: the disk images (a node's EROFS files, converted layers, scratch cow);
- :mod:`.qemu`: the accelerator, the QEMU command line, the time-bounded run;
- :mod:`.console` (pure): the guest's markers, parsed;
- :mod:`.verdict` (pure): the markers judged against the expectations;
- :mod:`.boot`: one proof run over many VMs, every file and process cleaned up.
"""
