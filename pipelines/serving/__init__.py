"""Models outside the batch jobs: MLflow logging and registry, the served pyfunc model, ``asd predict``."""
