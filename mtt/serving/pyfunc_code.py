"""The code file of mtt's MLflow model ("models from code": MLflow copies this file into each
saved model and runs it at load time instead of unpickling a model object; see ``mtt.serving.pyfunc``)."""

from mlflow.models import set_model

from mtt.serving.pyfunc import TaggerModel

set_model(TaggerModel())
