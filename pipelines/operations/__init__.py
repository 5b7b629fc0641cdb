"""Runs of the whole pipeline: the stage runner, ``asd run``, ``asd retrain``, ``asd submit``."""
