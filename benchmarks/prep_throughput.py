"""`emf prep` throughput against the bare encoder on the same captions, and its memory as the
number of generated scenes grows.

    python -m benchmarks.prep_throughput            # the figures in docs/benchmarks.md (~20 min)
    python -m benchmarks.prep_throughput --quick    # 2k samples, a smoke run (~5 min)

The limit is the bare text encoder (packaged MiniLM, default settings) encoding the captions
of scenes 0..N-1 in one process, model loaded and warmed up first, then timed alone: with 1
and 2 torch threads on 2k captions (the faster count is kept), then on all N captions before
and after the prep runs (the machine may be shared: the faster reading is the limit).
`emf prep` then prepares the same N scenes into a fresh folder in its own process (its own
local Ray instance), with the defaults and with two encoder actors of one thread each. Two
rates are reported for it: end to end (samples / the whole command's wall time: Python
start, Ray start, model loading, everything) and the pipeline's own (from the first shard's
dispatch to the last shard's record, actor start-up and model loading included).

"Encoder in its actor" is samples / the encode stage's summed seconds (times the number of
actors): the encoder's own speed inside Ray, without start-up or waiting.

Memory: the process tree of the prep run (driver, Ray's own processes, every worker) is
sampled every 0.25 s; the figure is the peak of the summed PSS (shared pages such as Ray's
object store counted once, split between the processes that map them), plus the driver's
own peak RSS. These runs use encoder.max_length=8 so that 100k scenes take minutes, not an
hour: memory is about the pipeline, whose per-shard arrays are only smaller with shorter L.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

DEFAULT_SETTINGS: list[str] = []
TWO_ACTORS = ["ray.encoders=2", "ray.encoder_cpus=0.75", "ray.loader_cpus=0.25", "ray.writer_cpus=0.25"]


# ---------------------------------------------------------------- children (fresh processes)

def bare_encoder(spec: dict) -> dict:
    import torch

    from emf_dist.scenes.generator import SceneConfig, iter_scenes
    from emf_dist.text_encoder import TextEncoder, TextEncoderConfig

    torch.set_num_threads(spec["threads"])
    captions = [s.caption for s in iter_scenes(SceneConfig(), 0, spec["samples"])]
    encoder = TextEncoder(TextEncoderConfig(**spec.get("encoder", {})))
    encoder.encode(captions[:256], batch_size=spec["batch_size"])  # warm-up
    start = time.perf_counter()
    encoder.encode(captions, batch_size=spec["batch_size"])
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "samples_per_s": spec["samples"] / seconds}


def prep(spec: dict) -> dict:
    from data_prep.config import PrepConfig
    from data_prep.job import run_prep
    from emf_dist.config import load_config

    cfg = load_config(PrepConfig, None, [f"out={spec['out']}", f"source.count={spec['samples']}", "progress=false",
                                         *spec["overrides"]])
    summary = run_prep(cfg, echo=lambda text: print(text, file=sys.stderr))
    return {"samples": summary.samples_written, "pipeline_seconds": summary.pipeline_seconds,
            "pipeline_samples_per_s": summary.samples_per_s, "seconds": summary.seconds,
            "stage_seconds": summary.stage_seconds, "encoders": cfg.ray.encoders}


# ---------------------------------------------------------------- parent

def _child(spec: dict, sample_memory: bool = False) -> dict:
    """Run a child spec in a fresh process; its JSON result plus wall time (and peak memory)."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.prep_throughput", json.dumps(spec)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks = {"tree_pss": 0, "driver_rss": 0}
    sampler = threading.Thread(target=_sample_memory, args=(proc, peaks), daemon=True)
    if sample_memory:
        sampler.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{spec} failed:\n{err[-3000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result["wall_s"] = wall
    if sample_memory:
        sampler.join()
        result["peak_tree_pss_mib"] = peaks["tree_pss"] / 2**20
        result["peak_driver_rss_mib"] = peaks["driver_rss"] / 2**20
    return result


def _sample_memory(proc: subprocess.Popen, peaks: dict) -> None:
    import psutil

    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            tree = [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            break
        total = 0
        for p in tree:
            try:
                total += p.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        try:
            peaks["driver_rss"] = max(peaks["driver_rss"], root.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        peaks["tree_pss"] = max(peaks["tree_pss"], total)
        time.sleep(0.25)


def throughput(samples: int) -> None:
    from data_prep.config import PrepConfig

    batch = PrepConfig().encode_batch_size
    bare = lambda n, t: _child({"mode": "bare", "samples": n, "threads": t, "batch_size": batch})["samples_per_s"]
    probe = {t: bare(min(samples, 2000), t) for t in (1, 2)}
    threads = max(probe, key=probe.get)
    print(f"bare encoder, batch {batch}, {min(samples, 2000)} captions: " +
          ", ".join(f"{t} thread(s) {r:.1f} samples/s" for t, r in probe.items()), flush=True)
    before = bare(samples, threads)
    runs = []
    for name, overrides in (("defaults (1 encoder actor, 1 thread)", DEFAULT_SETTINGS),
                            ("2 encoder actors x 1 thread", TWO_ACTORS)):
        with tempfile.TemporaryDirectory() as out:
            runs.append((name, _child({"mode": "prep", "samples": samples, "out": out, "overrides": overrides})))
    after = bare(samples, threads)  # the machine may be shared: bracket the prep runs, keep the faster
    limit = max(before, after)
    print(f"limit: bare encoder, {threads} thread(s), {samples} captions: {before:.1f} before and {after:.1f} after "
          f"the prep runs; the faster, {limit:.1f} samples/s, is the limit")
    print("| settings | samples | end-to-end samples/s | pipeline samples/s | encoder in its actor samples/s "
          "| end-to-end / limit | pipeline / limit | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in runs:
        end_to_end = r["samples"] / r["wall_s"]
        in_actor = r["samples"] / r["stage_seconds"]["encode"] * r["encoders"]
        print(f"| {name} | {r['samples']} | {end_to_end:.1f} | {r['pipeline_samples_per_s']:.1f} | {in_actor:.1f} | "
              f"{end_to_end / limit:.2f} | {r['pipeline_samples_per_s'] / limit:.2f} | {r['wall_s']:.0f} |", flush=True)


def memory(counts: list[int]) -> None:
    print("| scenes | wall s | pipeline samples/s | peak PSS, all processes MiB | peak RSS, driver MiB |")
    print("|---|---|---|---|---|")
    for samples in counts:
        with tempfile.TemporaryDirectory() as out:
            r = _child({"mode": "prep", "samples": samples, "out": out, "overrides": ["encoder.max_length=8"]},
                       sample_memory=True)
        print(f"| {samples} | {r['wall_s']:.0f} | {r['pipeline_samples_per_s']:.1f} | {r['peak_tree_pss_mib']:.0f} | "
              f"{r['peak_driver_rss_mib']:.0f} |", flush=True)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="2k samples and memory at 2k/10k: a smoke run")
    parser.add_argument("--part", choices=("all", "throughput", "memory"), default="all")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.part in ("all", "throughput"):
        throughput(2000 if args.quick else 10_000)
    if args.part in ("all", "memory"):
        memory([2000, 10_000] if args.quick else [10_000, 100_000])


if __name__ == "__main__":
    if len(sys.argv) == 2 and sys.argv[1].startswith("{"):
        spec = json.loads(sys.argv[1])
        result = bare_encoder(spec) if spec["mode"] == "bare" else prep(spec)
        print(json.dumps(result))
    else:
        main(sys.argv[1:])
