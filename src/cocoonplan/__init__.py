"""cocoonplan: Terraform-style, digest-pinned plans for cocoon microVMs."""

__version__ = "0.1.0"
