"""Defaults the CLI shows in its help, in a module that imports nothing, so that the help,
``--version`` and completion start without loading the rest of cocoonplan."""

DEFAULT_ROOT_DIR = "/var/lib/cocoon"
"""cocoon's ``--root-dir`` when none is given."""
BOOT_TIMEOUT_SECONDS = 120.0
"""The default bound of one proof boot: a TCG boot takes 2-3 s; the margin is for a loaded machine."""
