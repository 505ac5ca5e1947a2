"""The recorder attached to a trainer by a callback: :mod:`recorder.integrations.lightning` for
PyTorch Lightning (``pip install 'local-elasticity[lightning]'``) and
:mod:`recorder.integrations.transformers` for the Hugging Face ``Trainer``
(``pip install 'local-elasticity[transformers]'``).

Each module imports its trainer package; this package imports neither, so ``import recorder``
needs neither. :mod:`recorder.integrations.steps` holds what the callbacks share.
"""
