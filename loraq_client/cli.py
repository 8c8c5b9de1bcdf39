"""The `loraq` command: submit and follow training jobs, run batches, manage datasets, download LoRAs.

Exit codes: 0 all went well; 1 a job failed or was canceled (its error on stderr); 2 bad input
(a bad option or file, or a 4xx answer: the server's message on stderr); 3 the server could not be
reached or answered with a 5xx.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click
import yaml
from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from loraq_client import batch as batch_mod
from loraq_client.client import LORA_WEIGHTS, Client, Event, Job, LoraqError, as_dict

STATES = ["queued", "running", "canceling", "succeeded", "failed", "canceled"]
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


class JobEnded(Exception):
    """A followed job ended failed or canceled: exit code 1."""


def _client(ctx: click.Context) -> Client:
    obj = ctx.find_root().obj
    if "client" not in obj:
        obj["client"] = Client(obj.get("url"), obj.get("api_key"))
        ctx.find_root().call_on_close(obj["client"].close)
    return obj["client"]


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(as_dict(value), indent=2, default=str) + "\n")
    sys.stdout.flush()


def _fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)


def event_line(event: Event) -> str:
    d = event.data
    if event.type == "state":
        text = d.get("state", "?")
        if d.get("error"):
            text += f": {d['error']}"
    elif event.type == "step":
        text = (f"step {d.get('step')}/{d.get('total_steps')} loss={_fmt(d.get('loss'), '.4f')} "
                f"lr={_fmt(d.get('lr'), '.3g')} {_fmt(d.get('images_per_s'), '.1f')} img/s "
                f"eta={_fmt(d.get('eta_s'), '.0f')}s")
    elif event.type in ("error", "log", "prepare") and "message" in d:
        text = str(d["message"])
    else:
        text = json.dumps(d, separators=(",", ":"), default=str)
    return f"{event.id:>5} {event.type:<10} {text}"


def _folder(output: str | None, job_id: str) -> Path:
    folder = Path(output) if output else Path("loraq-output") / job_id
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _check_final(job: Job) -> None:
    if job.state != "succeeded":
        raise JobEnded(f"job {job.id} {job.state}" + (f": {job.error}" if job.error else ""))


# --------------------------------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--url", envvar="LORAQ_URL", help="service URL [env LORAQ_URL; default http://127.0.0.1:8000]")
@click.option("--api-key", envvar="LORAQ_API_KEY", help="API key [env LORAQ_API_KEY; local: ./var/admin-key]")
@click.pass_context
def cli(ctx: click.Context, url: str | None, api_key: str | None) -> None:
    """Train LoRA adapters on a loraq service."""
    ctx.obj = {"url": url, "api_key": api_key}


def _options(config: str | None, sets: tuple[str, ...]) -> dict:
    options: dict = {}
    if config:
        try:
            loaded = yaml.safe_load(Path(config).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise click.BadParameter(str(exc), param_hint="--config") from exc
        if not isinstance(loaded, dict):
            raise click.BadParameter("expected a mapping of trainer options", param_hint="--config")
        options.update(batch_mod.normalize(loaded))
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{item!r}: expected key=value", param_hint="--set")
        options[key.strip()] = batch_mod.yaml_scalar(value)
    return options


def _upload(client: Client, path: str, name: str | None = None, dedupe: bool = True):
    with Progress(TextColumn("upload {task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  console=err, transient=True) as progress:
        task = progress.add_task(Path(path).name, total=None)
        dataset = client.upload_dataset(path, name=name, dedupe=dedupe,
                                        progress=lambda sent, total: progress.update(task, completed=sent, total=total))
    refused = (dataset.report or {}).get("refused") or []
    err.print(f"dataset {dataset.id}: {dataset.image_count} images, {dataset.captioned_count} captioned"
              + (f", {len(refused)} refused" if refused else "")
              + (f" (already uploaded as {dataset.name!r}: reused, nothing new stored)" if dataset.reused else ""),
              highlight=False, markup=False)
    for item in refused[:20]:
        err.print(f"  refused {item.get('file')}: {item.get('reason')}", highlight=False)
    return dataset


def follow(client: Client, job: Job) -> Job:
    """Follow a job's events with a live progress bar on stderr; return the final job."""
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[ips]} img/s"),
               TextColumn("ETA {task.fields[eta]}")]
    with Progress(*columns, console=err) as progress:
        task = progress.add_task(f"{job.id} {job.state}", total=job.total_steps or None, completed=job.step,
                                 loss="-", ips="-", eta="-")

        def on_event(event: Event) -> None:
            d = event.data
            if event.type == "state":
                progress.update(task, description=f"{job.id} {d.get('state')}")
            elif event.type == "prepare":  # the latent cache encodes before the first step
                done, total, eta = (d.get("data") or {}).get("done"), (d.get("data") or {}).get("total"), d.get("eta_s")
                progress.update(task, description=f"{job.id} preparing latents {done}/{total}",
                                ips=_fmt(d.get("images_per_s"), ".1f"),
                                eta=time.strftime("%H:%M:%S", time.gmtime(eta)) if eta is not None else "-")
                if done == total:
                    progress.update(task, description=f"{job.id} running")
            elif event.type == "step":
                eta = d.get("eta_s")
                progress.update(task, completed=d.get("step", 0), total=d.get("total_steps") or None,
                                loss=_fmt(d.get("loss"), ".4f"), ips=_fmt(d.get("images_per_s"), ".1f"),
                                eta=time.strftime("%H:%M:%S", time.gmtime(eta)) if eta is not None else "-")

        final = client.wait(job.id, on_event=on_event)
        if final.state == "succeeded":
            progress.update(task, completed=final.total_steps or final.step, total=final.total_steps or None)
    return final


@cli.command()
@click.argument("path", required=False, type=click.Path(exists=True))
@click.option("--dataset", "dataset_id", help="an uploaded dataset's id (instead of PATH)")
@click.option("--base-model", required=True, help="a name `loraq models` lists")
@click.option("--config", type=click.Path(exists=True, dir_okay=False), help="YAML/JSON file of trainer options")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="a trainer option (YAML scalar); repeatable")
@click.option("--name", help="the job's name")
@click.option("--idempotency-key", help="resubmitting with the same key returns the same job")
@click.option("--no-dedupe", "no_dedupe", is_flag=True,
              help="store a new dataset even when you already have one with the same files")
@click.option("--priority", type=int, help="higher runs first among the jobs a worker fits [0]; above the "
              "server's LORAQ_MAX_JOB_PRIORITY only with an admin key")
@click.option("--num-gpus", type=click.IntRange(1), help="training processes, one per GPU, on one worker [1]")
@click.option("--gpu-class", help="run only on workers of this GPU class (e.g. a100-80gb, 4090)")
@click.option("--min-gpu-memory-gb", type=click.FloatRange(0, min_open=True),
              help="run only on workers whose GPUs have this much memory")
@click.option("--webhook-url", help="POSTed the job, signed, on each state change")
@click.option("--wait", is_flag=True, help="follow the job and download its LoRA at the end")
@click.option("-o", "--output", type=click.Path(file_okay=False), help="where --wait puts the LoRA [./loraq-output/<job id>]")
@click.pass_context
def submit(ctx, path, dataset_id, base_model, config, sets, name, idempotency_key, no_dedupe, priority, num_gpus,
           gpu_class, min_gpu_memory_gb, webhook_url, wait, output):
    """Submit a training job on PATH (a folder or zip, uploaded first) or --dataset ID.

    A PATH you uploaded before (the same files) reuses that dataset unless --no-dedupe.
    Prints the job id on stdout (and, with --wait, the downloaded LoRA's path)."""
    if bool(path) == bool(dataset_id):
        raise click.UsageError("give either PATH (a folder or zip) or --dataset ID")
    options = _options(config, sets)
    client = _client(ctx)
    if path:
        dataset_id = _upload(client, path, dedupe=not no_dedupe).id
    job = client.create_job(dataset_id, base_model, options, name=name, idempotency_key=idempotency_key,
                            priority=priority, num_gpus=num_gpus, gpu_class=gpu_class,
                            min_gpu_memory_gb=min_gpu_memory_gb, webhook_url=webhook_url)
    click.echo(job.id)
    sys.stdout.flush()
    err.print(f"job {job.id} {job.state}" + (f" (queue position {job.queue_position})" if job.queue_position else ""),
              highlight=False)
    if not wait:
        return
    final = follow(client, job)
    _check_final(final)
    target = client.download(final.id, LORA_WEIGHTS, _folder(output, final.id))
    err.print(f"job {final.id} succeeded; loss {_fmt(final.last_loss, '.4f')}; LoRA in {target}", highlight=False)
    click.echo(str(target))


# --------------------------------------------------------------------------------------------


def _plan_table(planned: list[batch_mod.PlannedJob]) -> Table:
    table = Table(title=f"{len(planned)} planned job(s)")
    for column in ("#", "name", "base_model", "dataset", "options", "placement", "key"):
        table.add_column(column, overflow="fold")
    for i, job in enumerate(planned, 1):
        table.add_row(str(i), job.name or "-", job.base_model, job.dataset.label(),
                      json.dumps(job.options, separators=(",", ":")),
                      json.dumps(job.fields, separators=(",", ":")) if job.fields else "-", job.key[-12:])
    return table


def _jobs_table(jobs: list[Job], title: str, created: list[bool | None] | None = None) -> Table:
    table = Table(title=title)
    for column in ("id", "name", "state", "step", "loss", "submitted"):
        table.add_column(column, overflow="fold")
    for i, job in enumerate(jobs):
        table.add_row(job.id, job.name or "-", job.state, f"{job.step}/{job.total_steps}",
                      _fmt(job.last_loss, ".4f"),
                      {True: "new", False: "existing", None: ""}[created[i] if created else None])
    return table


@cli.command("batch")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--wait", is_flag=True, help="show a live table until every job is final")
@click.option("--dry-run", is_flag=True, help="print the plan and submit nothing")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.pass_context
def batch_cmd(ctx, file, wait, dry_run, as_json):
    """Submit the jobs a batch YAML describes; a rerun submits only the missing ones."""
    try:
        planned = batch_mod.plan(file)
    except batch_mod.BatchError as exc:
        raise click.BadParameter(str(exc), param_hint="FILE") from exc
    if dry_run:
        if as_json:
            _print_json([{"name": p.name, "base_model": p.base_model, "dataset": p.dataset.label(),
                          "options": p.options, **p.fields, "idempotency_key": p.key} for p in planned])
        else:
            out.print(_plan_table(planned))
        return
    client = _client(ctx)
    batch_mod.submit(client, planned)
    jobs = [p.job for p in planned]
    created = [p.created for p in planned]
    new = sum(1 for c in created if c)
    if not wait:
        if as_json:
            _print_json([{**as_dict(p.job), "created": p.created} for p in planned])
        else:
            out.print(_jobs_table(jobs, f"{len(jobs)} job(s): {new} new, {len(jobs) - new} existing", created))
        return
    if as_json:
        jobs = _poll_until_final(client, jobs)
        _print_json([{**as_dict(j), "created": c} for j, c in zip(jobs, created)])
    else:
        with Live(_jobs_table(jobs, "batch", created), console=out, refresh_per_second=2) as live:
            jobs = _poll_until_final(client, jobs, lambda js: live.update(
                _jobs_table(js, f"{sum(j.final for j in js)}/{len(js)} final", created)))
    bad = [j for j in jobs if j.state != "succeeded"]
    for job in bad:
        err.print(f"job {job.id} {job.state}" + (f": {job.error}" if job.error else ""), highlight=False)
    if bad:
        raise JobEnded(f"{len(bad)} of {len(jobs)} job(s) did not succeed")


def _poll_until_final(client: Client, jobs: list[Job], on_update=None) -> list[Job]:
    while True:
        jobs = [j if j.final else client.job(j.id) for j in jobs]
        if on_update:
            on_update(jobs)
        if all(j.final for j in jobs):
            return jobs
        time.sleep(1.0)


# --------------------------------------------------------------------------------------------


@cli.group()
def jobs():
    """List, show, cancel, retry jobs and read their events."""


@jobs.command("list")
@click.option("--state", type=click.Choice(STATES))
@click.option("--limit", type=click.IntRange(1, 200), default=50, show_default=True)
@click.option("--offset", type=click.IntRange(0), default=0)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def jobs_list(ctx, state, limit, offset, as_json):
    page = _client(ctx).jobs(state=state, limit=limit, offset=offset)
    if as_json:
        return _print_json(page)
    out.print(_jobs_table(page.items, f"{len(page.items)} of {page.total} job(s)"))


@jobs.command("show")
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def jobs_show(ctx, job_id, as_json):
    job = _client(ctx).job(job_id)
    if as_json:
        return _print_json(job)
    table = Table(show_header=False, box=None)
    for key, value in as_dict(job).items():
        table.add_row(key, json.dumps(value) if isinstance(value, (dict, list)) else _fmt(value))
    out.print(table)


@jobs.command("cancel")
@click.argument("job_id")
@click.pass_context
def jobs_cancel(ctx, job_id):
    job = _client(ctx).cancel(job_id)
    click.echo(f"{job.id} {job.state}")


@jobs.command("retry")
@click.argument("job_id")
@click.pass_context
def jobs_retry(ctx, job_id):
    job = _client(ctx).retry(job_id)
    click.echo(f"{job.id} {job.state} (attempt {job.attempt})")


@jobs.command("checkpoint")
@click.argument("job_id")
@click.pass_context
def jobs_checkpoint(ctx, job_id):
    """Save a checkpoint of a running job at its next step."""
    click.echo(f"{job_id}: {_client(ctx).checkpoint_now(job_id)['message']}")


@jobs.command("sample")
@click.argument("job_id")
@click.pass_context
def jobs_sample(ctx, job_id):
    """Render a running job's validation prompt at its next step."""
    click.echo(f"{job_id}: {_client(ctx).sample_now(job_id)['message']}")


@jobs.command("logs")
@click.argument("job_id")
@click.option("-f", "--follow", "follow_", is_flag=True, help="follow live until the job ends")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per line")
@click.pass_context
def jobs_logs(ctx, job_id, follow_, as_json):
    """The job's events, one line each."""
    client = _client(ctx)
    for event in client.events(job_id, follow=follow_):
        click.echo(json.dumps(as_dict(event), default=str) if as_json else event_line(event))
        sys.stdout.flush()
    if follow_:
        _check_final(client.job(job_id))


# --------------------------------------------------------------------------------------------


@cli.group()
def datasets():
    """Upload, list and delete datasets."""


@datasets.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def datasets_list(ctx, as_json):
    page = _client(ctx).datasets(limit=200)
    if as_json:
        return _print_json(page)
    table = Table(title=f"{len(page.items)} of {page.total} dataset(s)")
    for column in ("id", "name", "images", "captioned", "bytes", "created"):
        table.add_column(column, overflow="fold")
    for d in page.items:
        table.add_row(d.id, d.name, str(d.image_count), str(d.captioned_count), str(d.total_bytes), str(d.created_at))
    out.print(table)


@datasets.command("upload")
@click.argument("path", type=click.Path(exists=True))
@click.option("--name")
@click.option("--no-dedupe", "no_dedupe", is_flag=True,
              help="store a new dataset even when you already have one with the same files")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def datasets_upload(ctx, path, name, no_dedupe, as_json):
    """Upload a folder or zip; prints the dataset id (an identical one of yours is reused)."""
    dataset = _upload(_client(ctx), path, name, dedupe=not no_dedupe)
    if as_json:
        return _print_json(dataset)
    click.echo(dataset.id)


@datasets.command("delete")
@click.argument("dataset_id")
@click.pass_context
def datasets_delete(ctx, dataset_id):
    _client(ctx).delete_dataset(dataset_id)
    click.echo(f"{dataset_id} deleted")


@cli.command()
@click.argument("job_id")
@click.option("-o", "--output", type=click.Path(file_okay=False), help="folder [./loraq-output/<job id>]")
@click.option("--name", default=LORA_WEIGHTS, show_default=True, help="the artifact's name")
@click.pass_context
def download(ctx, job_id, output, name):
    """Download a job's artifact (resumes a partial download; checks its sha256)."""
    target = _client(ctx).download(job_id, name, _folder(output, job_id))
    click.echo(str(target))


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def models(ctx, as_json):
    """The base models a job may use."""
    found = _client(ctx).models()
    if as_json:
        return _print_json(found)
    table = Table()
    for column in ("name", "family", "source", "available"):
        table.add_column(column, overflow="fold")
    for m in found:
        table.add_row(m.name, m.family or "-", m.source, "yes" if m.available else f"no: {m.problem}")
    out.print(table)


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="loraq", standalone_mode=False)
    except click.exceptions.Abort:
        err.print("aborted")
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except JobEnded as exc:
        err.print(str(exc), highlight=False, markup=False)
        sys.exit(1)
    except LoraqError as exc:
        err.print(f"error: {exc.message}" if not exc.status else f"error {exc.status}: {exc.message}",
                  highlight=False, markup=False)
        sys.exit(2 if 400 <= exc.status < 500 else 3)
    except batch_mod.BatchError as exc:
        err.print(f"error: {exc}", highlight=False, markup=False)
        sys.exit(2)
    sys.exit(0)


if __name__ == "__main__":
    main()
