"""Kubeflow Pipelines definitions of the project (`spade pipeline ...`); `pipelines.cli` imports nothing heavy."""
