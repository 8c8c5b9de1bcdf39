"""Prometheus metrics (GET /metrics), computed from the database at each scrape.

Nothing is counted in the API's memory: every number comes from the tables the service already
keeps (jobs, job_metrics, datasets) and the workers' Redis heartbeats, so any API process, or
several behind a balancer, answer the same, and a restart loses nothing. A consequence: the
histograms cover the jobs the database still holds, so deleting finished jobs lowers their
counts (Prometheus reads a drop as a counter reset, which `rate()` handles).

Scrape cost: a handful of aggregate queries, none per job but one per running job (a few rows
of its last steps each), whatever the number of jobs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import case, extract, func, select
from sqlalchemy.orm import Session, sessionmaker

from loraq.models import Dataset, Job, JobMetric, JobState, utcnow
from loraq import webhooks
from loraq.queue import job_queue
from loraq.settings import Settings
from loraq.workers import live_workers

log = logging.getLogger("loraq.api.metrics")

# Bucket bounds (seconds): jobs last minutes to hours; a job waits seconds to hours in the queue.
DURATION_BUCKETS = (60, 300, 900, 1800, 3600, 2 * 3600, 4 * 3600, 8 * 3600, 24 * 3600)
QUEUE_WAIT_BUCKETS = (1, 5, 15, 60, 300, 900, 1800, 3600, 4 * 3600, 24 * 3600)
SPEED_WINDOW = 20  # a running job's steps/s is measured over its last this many steps
BUSY_STATES = (JobState.running.value, JobState.canceling.value)
FINISHED_STATES = (JobState.succeeded.value, JobState.failed.value, JobState.canceled.value)


def seconds_between(session: Session, start, end):
    """SQL for `end - start` in seconds, on SQLite and PostgreSQL."""
    if session.get_bind().dialect.name == "sqlite":
        return (func.julianday(end) - func.julianday(start)) * 86400.0
    return extract("epoch", end - start)


class ServiceCollector(Collector):
    """The service's metrics, read from the database (and Redis for worker heartbeats) per scrape."""

    def __init__(self, settings: Settings, sessions: Callable[[], sessionmaker[Session]], redis: Callable):
        self.settings = settings
        # Callables: the app makes its session factory and Redis client at startup, after this.
        self._sessions = sessions
        self._redis = redis

    def describe(self) -> list[Metric]:
        return []  # registering must not query: the database may not be up yet

    def collect(self) -> Iterator[Metric]:
        with self._sessions()() as session:
            yield from self._jobs_by_state(session)
            yield from self._queue_depth(session)
            yield from self._steps_per_second(session)
            yield from self._workers(session)
            yield self._histogram(session, "loraq_job_duration_seconds",
                                  "Time from an attempt's start to the job's end, of finished jobs (their last "
                                  "attempt), by final state", Job.started_at, Job.finished_at, DURATION_BUCKETS,
                                  Job.state.in_(FINISHED_STATES), by_state=True)
            yield self._histogram(session, "loraq_job_queue_wait_seconds",
                                  "Time a job waited in the queue before its (last) attempt started",
                                  Job.queued_at, Job.started_at, QUEUE_WAIT_BUCKETS, Job.started_at.is_not(None))
            yield from self._uploads(session)
            deliveries = CounterMetricFamily("loraq_webhook_deliveries", "Webhook delivery attempts by outcome "
                                             "(success: a 2xx answer; failure: anything else)", labels=["outcome"])
            for outcome, count in webhooks.outcome_counts(session).items():
                deliveries.add_metric([outcome], count)
            yield deliveries

    # -- jobs ----------------------------------------------------------------------------------

    def _jobs_by_state(self, session: Session) -> Iterator[Metric]:
        counts = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        family = GaugeMetricFamily("loraq_jobs", "Jobs in the database, by state", labels=["state"])
        for state in JobState:
            family.add_metric([state.value], counts.get(state.value, 0))
        yield family

    def _queue_depth(self, session: Session) -> Iterator[Metric]:
        """Queued jobs by the Celery queue they route to (loraq.queue.job_queue: the default queue,
        or `{queue_name}.{class}` for a job asking for a GPU class). Listed: the default queue
        (0 when empty), every queue a queued job routes to, and every class queue a live worker
        of this deployment consumes (0 when empty: a drained queue reads 0, not a missing series)."""
        by_class = session.execute(select(Job.gpu_class, func.count()).where(Job.state == JobState.queued.value)
                                   .group_by(Job.gpu_class)).all()
        depths = {self.settings.queue_name: 0}
        for gpu_class, count in by_class:
            queue = job_queue(self.settings, gpu_class)
            depths[queue] = depths.get(queue, 0) + count
        redis = None
        try:
            redis = self._redis()
            for worker in live_workers(redis):
                for queue in worker.get("queues") or ():
                    if isinstance(queue, str) and queue.startswith(self.settings.queue_name + "."):
                        depths.setdefault(queue, 0)
        except Exception as error:  # noqa: BLE001 - Redis away: the database's numbers still count
            log.warning("metrics.redis_unavailable: %s", error)
            redis = None
        family = GaugeMetricFamily("loraq_queue_depth", "Jobs waiting to run (queued in the database), by the "
                                   "queue they route to", labels=["queue"])
        for queue in sorted(depths):
            family.add_metric([queue], depths[queue])
        yield family
        messages = GaugeMetricFamily("loraq_queue_messages", "Messages waiting in the broker's queue (Redis), "
                                     "by queue; absent while Redis does not answer", labels=["queue"])
        if redis is not None:
            try:
                lengths = {queue: redis.llen(queue) for queue in sorted(depths)}
            except Exception as error:  # noqa: BLE001
                log.warning("metrics.redis_unavailable: %s", error)
            else:
                for queue, length in lengths.items():
                    messages.add_metric([queue], length)
        yield messages

    def _steps_per_second(self, session: Session) -> Iterator[Metric]:
        family = GaugeMetricFamily("loraq_job_steps_per_second", "Optimizer steps per second of each running job, "
                                   f"over its last {SPEED_WINDOW} steps", labels=["job_id", "worker"])
        running = session.execute(select(Job.id, Job.step, Job.worker)
                                  .where(Job.state == JobState.running.value, Job.step > 1)).all()
        for job in running:
            window = session.execute(select(JobMetric.step, JobMetric.time)
                                     .where(JobMetric.job_id == job.id, JobMetric.step > job.step - SPEED_WINDOW)
                                     .order_by(JobMetric.step)).all()
            if len(window) < 2:
                continue
            (first_step, first_time), (last_step, last_time) = window[0], window[-1]
            seconds = (last_time - first_time).total_seconds()
            if seconds > 0:
                family.add_metric([job.id, job.worker or ""], (last_step - first_step) / seconds)
        yield family

    def _workers(self, session: Session) -> Iterator[Metric]:
        """Busy: the workers running a job whose lease is current (the database's record). Alive:
        those plus every worker whose Redis heartbeat is live (idle ones are only known there)."""
        busy = set(session.scalars(select(Job.worker).distinct().where(
            Job.state.in_(BUSY_STATES), Job.worker.is_not(None), Job.lease_until >= utcnow())))
        alive = set(busy)
        try:
            alive |= {worker.get("name") for worker in live_workers(self._redis())}
        except Exception as error:  # noqa: BLE001 - without Redis, the busy ones are all known alive
            log.warning("metrics.redis_unavailable: %s", error)
        alive.discard(None)
        yield GaugeMetricFamily("loraq_workers_alive", "Workers with a live heartbeat or a current lease",
                                value=len(alive))
        yield GaugeMetricFamily("loraq_workers_busy", "Workers running a job (its lease current)", value=len(busy))

    def _histogram(self, session: Session, name: str, documentation: str, start, end, bounds, where,
                   by_state: bool = False) -> Metric:
        """A histogram of `end - start` over the jobs matching `where`, bucketed in SQL."""
        seconds = seconds_between(session, start, end)
        columns = [func.count(), func.coalesce(func.sum(seconds), 0.0)]
        columns += [func.sum(case((seconds <= bound, 1), else_=0)) for bound in bounds]
        query = select(Job.state, *columns).group_by(Job.state) if by_state else select(*columns)
        family = HistogramMetricFamily(name, documentation, labels=["state"] if by_state else None)
        query = query.where(where, start.is_not(None), end.is_not(None))  # a job canceled while queued never started
        rows = {row[0]: row[1:] for row in session.execute(query)} if by_state else {None: session.execute(query).one()}
        for state in (FINISHED_STATES if by_state else (None,)):
            count, total, *cumulative = rows.get(state) or (0, 0.0, *([0] * len(bounds)))
            buckets = [(_bound(b), c or 0) for b, c in zip(bounds, cumulative)] + [("+Inf", count)]
            family.add_metric([state] if by_state else [], buckets, float(total or 0.0))
        return family

    # -- uploads ---------------------------------------------------------------------------------

    def _uploads(self, session: Session) -> Iterator[Metric]:
        count, total = session.execute(select(func.count(), func.coalesce(func.sum(Dataset.total_bytes), 0))).one()
        yield GaugeMetricFamily("loraq_upload_bytes", "Bytes of the uploaded datasets stored (an identical upload "
                                "reused an existing dataset and stored nothing)", value=total)
        yield GaugeMetricFamily("loraq_datasets", "Uploaded datasets stored", value=count)


def _bound(value: float) -> str:
    return f"{float(value):g}" if value != int(value) else f"{int(value)}.0"


def make_registry(settings: Settings, sessions: Callable[[], sessionmaker[Session]], redis: Callable
                  ) -> CollectorRegistry:
    """A registry of its own per app (never the process-wide default: two apps in one process,
    as in the tests, would collide), holding the service's collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServiceCollector(settings, sessions, redis))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
