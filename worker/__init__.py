"""The worker: a Celery consumer that claims queued jobs and runs the trainer for each.

`python -m worker` starts one worker process; `worker.runner.run_job` is the work itself, a plain
function that needs no Celery.
"""
