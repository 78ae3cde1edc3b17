"""Resident memory over one benchmark worker run (not a test): samples RSS every 20 ms while bench_text_dpo.py's
mmalign / TRL / bare worker trains SmolLM2-135M + LoRA, and prints the peak, the RSS at every optimizer step and a
0.5 s timeline, to tell a step's peak from loading and from memory the allocator keeps between steps.

    PYTHONPATH=. OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/rss_timeline.py mmalign 3   # impl, timed steps
"""
import argparse
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_text_dpo as bench  # noqa: E402


def rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("impl", choices=["mmalign", "trl", "bare"])
    parser.add_argument("steps", type=int, nargs="?", default=3)
    parser.add_argument("--mmap-threshold", type=int, default=None,
                        help="mmalign: glibc M_MMAP_THRESHOLD in bytes instead of training.release_freed_memory's "
                             "(0 = leave glibc's dynamic threshold)")
    parser.add_argument("--trim", choices=["step", "backward", "both", "reference", "step+reference"], default=None,
                        help="malloc_trim(0) after every optimizer step, before every backward, or both")
    cli = parser.parse_args()
    if cli.mmap_threshold is not None:
        import ctypes

        import mmalign.engine.allocator as allocator

        allocator._applied = False  # the trainer leaves the allocator to this script
        if cli.mmap_threshold:
            ctypes.CDLL("libc.so.6").mallopt(-3, cli.mmap_threshold)
    samples, marks, start, stop = [], [], time.perf_counter(), threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append((time.perf_counter() - start, rss_mib()))
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    torch.set_num_threads(2)
    os.environ["HF_HUB_OFFLINE"] = "1"
    args = argparse.Namespace(impl=cli.impl, model="smollm2", loss="dpo", lora=1, variant="live", steps=cli.steps,
                              warmup=1, threads=2, pairs=8, batch_size=8, gradient_checkpointing="off")
    if cli.trim:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        if cli.trim in ("step", "both"):
            register_optimizer_step_post_hook(lambda *_: libc.malloc_trim(0))
        if "reference" in cli.trim:
            from mmalign.text.modeling import references

            plain_call = references.AdapterReference.__call__

            def call(self, *a, **k):
                out = plain_call(self, *a, **k)
                libc.malloc_trim(0)
                return out

            references.AdapterReference.__call__ = call
        if cli.trim in ("step+reference",):
            register_optimizer_step_post_hook(lambda *_: libc.malloc_trim(0))
        if cli.trim in ("backward", "both"):
            plain_backward = torch.Tensor.backward

            def backward(self, *a, **k):
                libc.malloc_trim(0)
                return plain_backward(self, *a, **k)

            torch.Tensor.backward = backward
    register_optimizer_step_post_hook(lambda *_: marks.append((time.perf_counter() - start, rss_mib(), time.process_time())))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        path = bench.model_path("smollm2", work)
        {"mmalign": bench.run_mmalign, "trl": bench.run_trl, "bare": bench.run_bare}[cli.impl](args, path, work, bench.StepTimer())
    stop.set()
    peak = max(samples, key=lambda s: s[1])
    print(f"{cli.impl}: peak RSS {peak[1]:.0f} MiB at {peak[0]:.1f} s (ru_maxrss "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB); RSS at each optimizer step: "
          + ", ".join(f"{r:.0f} MiB ({t:.1f} s)" for t, r, _ in marks))
    cpu = [b[2] - a[2] for a, b in zip(marks, marks[1:])]
    print(f"CPU s/step after the first: {' '.join(f'{c:.2f}' for c in cpu)}; load average {os.getloadavg()[0]:.1f}")
    buckets: dict[float, float] = {}
    for t, r in samples:
        buckets[round(t * 2) / 2] = max(buckets.get(round(t * 2) / 2, 0.0), r)
    print("timeline (s: max MiB): " + " ".join(f"{k:.1f}:{v:.0f}" for k, v in sorted(buckets.items())))


if __name__ == "__main__":
    main()
