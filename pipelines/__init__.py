"""Ray jobs, MLflow tracking and the command-line interface around the ``asd`` library."""

import os

# MLflow reads these once, when it is first imported, and any module of the package may import it:
# no telemetry, and no console handler of its own (pipelines.console routes MLflow's records)
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
