"""``gradscope.watch`` inside training frameworks, as their callbacks.

- :mod:`gradscope.integrations.huggingface`: ``GradscopeCallback`` for the Hugging Face
  ``Trainer`` (needs ``transformers``: ``pip install 'gradscope[hf]'``);
- :mod:`gradscope.integrations.lightning`: ``GradscopeLightningCallback`` for Lightning
  (``lightning.pytorch``, or ``pytorch_lightning``: ``pip install 'gradscope[lightning]'``).

Each callback watches the first ``horizon`` optimizer steps of the run and writes the
report (``gradscope-watch.html`` / ``.json``) when training ends or the horizon is
reached, whichever comes first. Importing this package imports neither framework.
"""
