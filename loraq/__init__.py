"""Domain code shared by the API and the worker: settings, ORM models, job states, events, storage.

It never imports the trainer's heavy modules (torch); only `trainer.config` and `trainer.files`.
"""
