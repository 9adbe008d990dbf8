"""Model partitioning: cut points, edge/cloud halves, manifests, privacy training and audits."""

__edgesplit__ = True

__all__: list[str] = []
