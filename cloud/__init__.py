"""Cloud side: federated trainer, aggregation strategies, split-learning and inference services."""

__edgesplit__ = True

__all__: list[str] = []
