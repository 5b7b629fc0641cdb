"""Robust prototype learning for anomalous sound detection (Zeng et al., Interspeech 2023).

The method as a pure-PyTorch library: clip metadata, audio features, the embedding
network (frontend), prototypes and losses for training, and the Mahalanobis scoring
backend with the DCASE metrics. Nothing here imports Ray or MLflow.
"""

__version__ = "0.1.0"
