"""The registered model's code (MLflow *models from code*): logged by
:func:`pipelines.serving.registry.log_pyfunc_model` instead of a pickled
:class:`~pipelines.serving.pyfunc_model.AsdPyfuncModel`. ``mlflow.pyfunc.load_model`` runs this file to
get the empty model, which then reads its weights and statistics from the version's artifacts.
Not meant to be imported."""

from mlflow.models import set_model

from pipelines.serving.pyfunc_model import AsdPyfuncModel

set_model(AsdPyfuncModel())
