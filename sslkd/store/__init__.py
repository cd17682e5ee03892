"""Storage: atomic artifacts with sidecars, checkpoints of long stages, the workspace's file layout.

Imports only the ground: docs/architecture.md."""
