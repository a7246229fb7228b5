"""Scale benchmark: bytes/s and peak memory of the whole job as the corpus grows.

A tiny random byte-level model (1 layer, width 32) keeps the model's share small on a GPU; on this
CPU its 2,048-position attention still takes most of the time, so the job's own count of the time
inside the model is set apart, and what is left is the host path: listing, reading, chunking,
baselines, range coding, writing, dedup. Corpora
are real text available offline (the Python standard library's sources, repeated with a counter so
that no two documents are equal):

- ``small``: one JSONL shard of about 4 MB;
- ``large``: one JSONL shard of about 40 MB plus one 10 MB single-document text file.

Each job runs in its own process (``lmc-audit run``, DirectRunner); its peak RSS comes from
``wait4`` (the kernel's high-water mark of the process and the workers it waited for), and each
process's own (``ProcessPeaks``: with ``-- --direct_running_mode=multi_processing`` the runner's
apart from the SDK workers'). The
host path's rate leaves out the time inside the model (run.json's ``job_metrics.model_seconds``)
and, from the difference of the two jobs, the fixed cost of starting one.
``--profile`` adds a cProfile of the small job (top functions by cumulative time).

    python benchmarks/scale.py --json benchmarks/results/scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import sysconfig
import time
from pathlib import Path


def tiny_model(path: Path) -> str:
    import torch

    from lmc_audit.pipelines.default_model.train import build_model

    if not (path / "config.json").exists():
        torch.manual_seed(0)
        build_model(hidden=32, layers=1, heads=2, ffn=64, max_positions=4096).save_pretrained(path)
    return str(path)


def _texts():
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.rglob("*.py"))
    round_ = 0
    while True:
        for p in files:
            text = p.read_text("utf-8", errors="replace")
            if text.strip():
                yield f"# copy {round_} of {p.name}\n{text}"
        round_ += 1


def jsonl_shard(path: Path, size: int) -> Path:
    if path.exists() and path.stat().st_size >= size:
        return path
    total = 0
    with open(path, "w") as f:
        for i, text in enumerate(_texts()):
            line = json.dumps({"id": f"doc{i}", "text": text}) + "\n"
            f.write(line)
            total += len(line)
            if total >= size:
                break
    return path


def text_document(path: Path, size: int) -> Path:
    if path.exists() and path.stat().st_size >= size:
        return path
    total = 0
    with open(path, "w") as f:
        for text in _texts():
            f.write(text)
            total += len(text)
            if total >= size:
                break
    return path


class ProcessPeaks:
    """Each process's own high-water mark of resident memory (``VmHWM`` in ``/proc/PID/status``) for
    a job's process and its descendants, read every ``interval`` seconds from a thread.

    Why: ``wait4``'s ``ru_maxrss`` is the largest of them, which cannot say whether the peak belongs
    to the runner (under DirectRunner the runner holds every shuffle's data in memory; on Dataflow
    shuffles live in the shuffle service) or to an SDK worker (``--direct_running_mode
    multi_processing`` runs the job's steps in worker processes, as Dataflow does)."""

    def __init__(self, pid: int, interval: float = 0.25):
        import threading

        self.root, self.interval, self.peaks, self.commands = pid, interval, {}, {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _children(self) -> dict[int, list[int]]:
        tree: dict[int, list[int]] = {}
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    ppid = int(Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                tree.setdefault(ppid, []).append(int(entry.name))
        return tree

    def _sample(self) -> None:
        tree, todo = self._children(), [self.root]
        while todo:
            pid = todo.pop()
            todo += tree.get(pid, [])
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("VmHWM:"):
                    self.peaks[pid] = max(self.peaks.get(pid, 0), int(line.split()[1]) // 1024)
            if pid not in self.commands:
                try:
                    self.commands[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
                except OSError:
                    pass

    def _watch(self) -> None:
        while not self._done.wait(self.interval):
            self._sample()

    def stop(self) -> dict:
        """Peaks in MiB: ``runner`` (the job's own process) and ``workers`` (its Python descendants)."""
        self._done.set()
        self._thread.join()
        workers = {pid: mib for pid, mib in self.peaks.items()
                   if pid != self.root and "python" in self.commands.get(pid, "")}
        return {"runner_peak_rss_mib": self.peaks.get(self.root),
                "worker_peak_rss_mib": max(workers.values()) if workers else None, "workers": len(workers)}


def run_job(inputs: list[Path], output: Path, model: str, extra: list[str], profile: Path | None = None) -> dict:
    cmd = [sys.executable]
    if profile:
        cmd += ["-m", "cProfile", "-o", str(profile)]
    cmd += ["-m", "lmc_audit.pipelines.cli", "run", "--input", *map(str, inputs),
            "--output", str(output), "--model", model, "--id-field", "id", "--overwrite", "--quiet", *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peaks = ProcessPeaks(proc.pid)
    _, status, usage = os.wait4(proc.pid, 0)
    per_process = peaks.stop()
    wall = time.perf_counter() - t0
    stderr = proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"job failed:\n{stderr[-3000:]}")
    record = json.loads((output / "run.json").read_text())
    size = sum(p.stat().st_size for p in inputs)
    model_s = record.get("job_metrics", {}).get("model_seconds", 0.0)
    return {"input_bytes": size, "documents": record["counts"]["documents"], "chunks": record["counts"]["chunks"],
            "wall_s": round(wall, 1), "bytes_per_s": round(size / wall), "peak_rss_mib": round(usage.ru_maxrss / 1024),
            # The model's forwards (scoring, NCD, verification) run on the accelerator in production;
            # the rest of the wall time is the host path, one process here.
            "model_s": round(model_s, 1), "host_s": round(wall - model_s, 1),
            "host_bytes_per_s": round(size / max(wall - model_s, 1e-9)), **per_process}


def host_rate(small: dict, large: dict) -> dict:
    """The host path's bytes/s from the difference of two jobs, so that the fixed cost of a job
    (imports, loading the model, planning, the report) drops out, as it does on a long job."""
    db = large["input_bytes"] - small["input_bytes"]
    dt = (large["wall_s"] - large["model_s"]) - (small["wall_s"] - small["model_s"])
    fixed = small["host_s"] - small["input_bytes"] * dt / db
    return {"marginal_host_bytes_per_s": round(db / dt), "fixed_s": round(fixed, 1)}


def top_functions(profile: Path, n: int = 25) -> list[str]:
    import io
    import pstats

    out = io.StringIO()
    pstats.Stats(str(profile), stream=out).sort_stats("tottime").print_stats(n)
    return [line for line in out.getvalue().splitlines() if line.strip()][-n:]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/lmc-audit-scale")
    p.add_argument("--small-mb", type=float, default=4)
    p.add_argument("--large-mb", type=float, default=40)
    p.add_argument("--document-mb", type=float, default=10)
    p.add_argument("--only", choices=["small", "large"], default=None)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--json", default=None)
    p.add_argument("job_args", nargs="*", help="extra `lmc-audit run` flags (after --)")
    args = p.parse_args(argv)
    work = Path(args.workdir)
    (work / "small").mkdir(parents=True, exist_ok=True)
    (work / "large").mkdir(parents=True, exist_ok=True)
    model = tiny_model(work / "model")
    mb = 1 << 20
    corpora = {
        "small": [jsonl_shard(work / "small" / "shard.jsonl", int(args.small_mb * mb))],
        "large": [jsonl_shard(work / "large" / "shard.jsonl", int(args.large_mb * mb)),
                  text_document(work / "large" / "book.txt", int(args.document_mb * mb))],
    }
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "job_args": args.job_args, "jobs": {}}
    for name, inputs in corpora.items():
        if args.only and name != args.only:
            continue
        prof = work / f"{name}.prof" if args.profile and name == "small" else None
        result["jobs"][name] = run_job(inputs, work / f"out-{name}", model, args.job_args, prof)
        if prof:
            result["jobs"][name]["profile_top"] = top_functions(prof)
        print(json.dumps({name: result["jobs"][name]}, indent=2), flush=True)
    jobs = result["jobs"]
    if "small" in jobs and "large" in jobs:
        result["rss_large_over_small"] = round(jobs["large"]["peak_rss_mib"] / jobs["small"]["peak_rss_mib"], 3)
        result["host_path"] = host_rate(jobs["small"], jobs["large"])
        print(json.dumps({"host_path": result["host_path"]}), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
