"""Ray jobs, MLflow tracking and the command-line interface around the ``asd`` library."""

import os

# MLflow reads this once, when it is first imported: every module of the package may import it
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
