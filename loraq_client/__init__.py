"""loraq_client: the `loraq` command and a Python client for the loraq service (httpx, click, rich, pyyaml)."""

from loraq_client.client import (Artifact, Client, Dataset, Event, Job, LoraqError, Metric, Model, Page,
                                 FINAL_STATES, LORA_WEIGHTS)

__all__ = ["Artifact", "Client", "Dataset", "Event", "Job", "LoraqError", "Metric", "Model", "Page",
           "FINAL_STATES", "LORA_WEIGHTS"]
