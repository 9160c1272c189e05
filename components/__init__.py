"""Kubeflow Pipelines components of the training pipeline: one module per stage, each a thin call into `spade`.

Every component is a lightweight Python component on the project image (``IMAGE``: ``$SPADE_IMAGE``, default
``ghcr.io/spade-mlops/spade:latest``) that installs nothing at run time: the image already holds spade, kfp and
torch, so the same code runs in a cluster and under ``kfp.local`` (``SubprocessRunner(use_venv=False)``).
Imports live inside the function bodies (KFP ships each function's source on its own); glue shared by
several components lives in ``components.runtime`` and is imported from the installed package at run time.

Importing this package does not import kfp; the stage modules do.
"""

import os

DEFAULT_IMAGE = "ghcr.io/spade-mlops/spade:latest"
IMAGE = os.environ.get("SPADE_IMAGE") or DEFAULT_IMAGE


def spade_component(func):  # noqa: ANN001, ANN201
    """`@dsl.component` on the project image: no pip installs, not even of kfp."""
    from kfp import dsl

    return dsl.component(func, base_image=IMAGE, packages_to_install=[], install_kfp_package=False)
