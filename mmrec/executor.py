"""Running many trainings (a comparison or a grid): one at a time, N at once on this machine, or on Ray.

A job is a resolved configuration and a run folder.  ``execute`` trains it in the calling process and
is what every backend calls: in this process (``workers == 1``), in N spawned processes (``--workers N``,
the CPU threads split between them, one GPU each round-robin when there are several), or as Ray tasks
(``--backend ray [--address HOST:PORT]``; Ray is an optional extra).  The caller alone writes the results
store, as each job returns, so a kill loses at most the jobs in flight; a job whose folder already holds
a finished result (killed after training, before it was stored) is read back, and one with a
``last.pth`` continues from it.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

log = logging.getLogger("mmrec")


@dataclass
class Job:
    config: dict          # the resolved configuration (Config.to_dict())
    out: str              # its run folder
    key: str              # its key in the results store
    label: dict = field(default_factory=dict)  # kind, dataset, model, tag, grid point: what tables group by


def execute(job: Job, quiet: bool = True) -> dict:
    """Train ``job`` here and return its result dict (or the finished result already in its folder);
    ``quiet``: its log goes to its folder only (concurrent jobs), else also to stdout."""
    import json

    from mmrec.config import Config
    from mmrec.quick_start import setup_logging, train_one

    out = Path(job.out)
    done = out / "result.json"
    if done.exists() and not (out / "FAILED").exists():
        result = json.loads(done.read_text())
        result["result_path"] = str(done)
        return result
    out.mkdir(parents=True, exist_ok=True)
    setup_logging(out, quiet=quiet)
    try:
        result = train_one(Config(job.config), out, resume=(out / "last.pth").exists())
    except Exception as err:
        (out / "FAILED").write_text(f"{type(err).__name__}: {err}\n")
        raise
    (out / "FAILED").unlink(missing_ok=True)
    result["result_path"] = str(done)
    return result


def _threads_per_job(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // workers)


def _placed(job: Job, index: int, workers: int) -> Job:
    """A job for one of ``workers`` concurrent slots: its share of the CPU threads (unless set), and a GPU
    of its own round-robin when there are several."""
    cfg = dict(job.config)
    if int(cfg.get("num_threads") or 0) == 0:
        cfg["num_threads"] = _threads_per_job(workers)
    if cfg.get("use_gpu"):
        import torch

        n_gpus = torch.cuda.device_count()
        if n_gpus > 1:
            cfg["gpu_id"] = index % n_gpus
    return Job(cfg, job.out, job.key, job.label)


def run_jobs(jobs: list[Job], on_done: Callable[[Job, dict | None, str | None], None], workers: int = 1,
             backend: str = "local", address: str | None = None) -> None:
    """Run every job; ``on_done(job, result, error)`` is called in this process as each one ends."""
    if not jobs:
        return
    if backend == "ray":
        _run_ray(jobs, on_done, workers, address)
    elif workers <= 1:
        for i, job in enumerate(jobs, 1):
            log.info(f"running {i}/{len(jobs)}: {job.label.get('name', job.key)} ({len(jobs) - i} more after it)")
            try:
                result = execute(job, quiet=False)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as err:  # the other jobs go on; the failure is reported at the end
                on_done(job, None, f"{type(err).__name__}: {err}")
                continue
            on_done(job, result, None)
    else:
        _run_processes(jobs, on_done, workers)


def _run_processes(jobs: list[Job], on_done, workers: int) -> None:
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    ctx = multiprocessing.get_context("spawn")  # no forked torch state
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        pending = {pool.submit(execute, _placed(job, i, workers)): job for i, job in enumerate(jobs)}
        try:
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    job = pending.pop(fut)
                    err = fut.exception()
                    on_done(job, None if err else fut.result(), f"{type(err).__name__}: {err}" if err else None)
        except KeyboardInterrupt:
            for fut in pending:
                fut.cancel()
            raise


def _run_ray(jobs: list[Job], on_done, workers: int, address: str | None) -> None:
    try:
        import ray
    except ImportError:
        from mmrec.config import ConfigError

        raise ConfigError("--backend ray needs Ray, an optional extra: pip install 'ray>=2.9' "
                          "(or leave --backend out to run on this machine)") from None
    if not ray.is_initialized():
        local = {} if address else {"num_cpus": os.cpu_count(), "include_dashboard": False}  # a lean local instance
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False, **local)
    threads = _threads_per_job(max(workers, 1))
    remote = ray.remote(num_cpus=threads)(execute)
    refs = {remote.remote(_placed(job, i, max(workers, 1))): job for i, job in enumerate(jobs)}
    while refs:
        ready, _ = ray.wait(list(refs), num_returns=1)
        for ref in ready:
            job = refs.pop(ref)
            try:
                on_done(job, ray.get(ref), None)
            except ray.exceptions.RayTaskError as err:
                on_done(job, None, str(err.cause if getattr(err, "cause", None) else err).splitlines()[-1])


def pending_jobs(jobs: Iterable[Job], stored: set[str]) -> list[Job]:
    return [j for j in jobs if j.key not in stored]
