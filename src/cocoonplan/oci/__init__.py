"""OCI distribution: references, manifests, and the content stores bytes are read from."""
