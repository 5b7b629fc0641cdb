"""Public datasets the pipeline reads: the DCASE Task 2 catalogue (``dcase_task2.yaml``) and
``asd download`` (:mod:`pipelines.datasets.download`)."""
