"""Ray jobs, MLflow tracking and the command-line interface around the ``asd`` library."""
