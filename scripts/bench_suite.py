#!/usr/bin/env python
"""Run a named set of benchmarks (the tables of docs/benchmarks.md) and collect their JSON in one file.

    python scripts/bench_suite.py --suite gpu --out outputs/bench_gpu
    python scripts/bench_suite.py --suite cpu --out outputs/bench_cpu

Each entry runs scripts/bench_generate.py, scripts/bench_train.py, scripts/check_parity.py or
scripts/check_training.py in its own process (peak-memory numbers stay per entry) with a time limit.
``results.json`` in ``--out`` is rewritten after every entry, so a suite cut short (a lent GPU machine's time
running out) still leaves what it measured; the most important entry of a suite comes first. A failed or timed-out
entry is recorded with its error and the suite goes on. Ends with a Markdown table of the results and exits 1 if
any entry failed.
"""
import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from anywhere without installing

from models.checkpoint import atomic_save  # noqa: E402
from utils import cli  # noqa: E402

GEN, TRAIN = "bench_generate.py", "bench_train.py"
D16 = ["--size", "star-d16", "--resolution", "256"]
D30_1024 = ["--size", "star-d30", "--resolution", "1024"]
SUITES: dict[str, list[tuple[str, str, list[str]]]] = {
    # Issue targets first: d30 at 1024² with the sampler head in bf16, then batch-32 throughput at d16 / 256².
    "gpu": [
        ("parity_cuda", "check_parity.py", ["--device", "cuda", "--float-tol", "2e-5"]),
        ("train_loop_cuda_bf16", "check_training.py", ["--precision", "bf16"]),  # ~2 min: the loop, never yet on CUDA
        ("gen_d30_1024_sampler_bf16_compile", GEN, [*D30_1024, "--sampler", "--dtype", "bf16", "--compile",
                                                    "--repeats", "3"]),
        ("gen_d30_1024_sampler_bf16", GEN, [*D30_1024, "--sampler", "--dtype", "bf16", "--repeats", "3"]),
        ("gen_d16_256_b32_bf16", GEN, [*D16, "--batch", "32", "--dtype", "bf16", "--repeats", "5"]),
        ("gen_d16_256_b1_fp32", GEN, [*D16, "--dtype", "fp32", "--repeats", "5"]),
        ("train_d16_256_b32_bf16", TRAIN, [*D16, "--batch", "32", "--dtype", "bf16", "--repeats", "5"]),
        ("train_d16_256_b32_bf16_flex", TRAIN, [*D16, "--batch", "32", "--dtype", "bf16", "--attention", "flex",
                                                "--repeats", "5"]),
    ],
    # The reference machine's table (2 threads, fp32), against the official timings in the issue.
    "cpu": [
        ("gen_d16_256_b1", GEN, [*D16, "--threads", "2", "--repeats", "3"]),
        ("train_d16_256_b4", TRAIN, [*D16, "--batch", "4", "--threads", "2", "--repeats", "1"]),
        ("gen_tiny", GEN, ["--size", "star-tiny", "--threads", "2", "--repeats", "3", "--top-k", "0", "--top-p", "0"]),
        ("train_tiny", TRAIN, ["--size", "star-tiny", "--threads", "2", "--repeats", "3"]),
    ],
    # Seconds on a CPU: checks that every script still keeps its JSON contract (tests/test_bench.py).
    "smoke": [
        ("gen_tiny", GEN, ["--size", "star-tiny", "--threads", "1", "--repeats", "1", "--top-k", "0", "--top-p", "0"]),
        ("gen_tiny_sampler", GEN, ["--size", "star-tiny", "--threads", "1", "--repeats", "1", "--sampler"]),
        ("train_tiny", TRAIN, ["--size", "star-tiny", "--threads", "1", "--repeats", "1"]),
        ("train_tiny_ckpt", TRAIN, ["--size", "star-tiny", "--threads", "1", "--repeats", "1",
                                    "--activation-checkpointing"]),
    ],
}
TABLE_KEYS = ("seconds_median", "seconds_at_matmul_peak", "images_per_s", "transformer_seconds_median",
              "vqvae_decode_seconds_median", "peak_cuda_memory_gb", "peak_rss_gb")


def run_entry(script: str, args: list[str], timeout: float) -> dict:
    """Run one benchmark script; its JSON output goes under "result"."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(REPO / "scripts" / script), *args], capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "error": f"no result within {timeout:g} s"}
    entry = {"wall_seconds": time.perf_counter() - t0}
    try:
        entry["result"] = json.loads(proc.stdout)
    except json.JSONDecodeError:
        pass
    entry["status"] = "ok" if proc.returncode == 0 and "result" in entry else "failed"
    if entry["status"] == "failed":
        entry["error"] = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
    return entry


def markdown_table(entries: list[dict]) -> str:
    rows = ["| entry | status | " + " | ".join(TABLE_KEYS) + " |", "|---|---|" + "---|" * len(TABLE_KEYS)]
    for e in entries:
        result = e.get("result", {})
        cells = [f"{result[k]:.3g}" if isinstance(result.get(k), float) else "" for k in TABLE_KEYS]
        rows.append(f"| {e['name']} | {e['status']} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", required=True, choices=SUITES)
    parser.add_argument("--out", required=True, type=Path, help="folder for results.json")
    parser.add_argument("--only", nargs="+", metavar="ENTRY", help="run these entries of the suite only")
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed per entry")
    parser.add_argument("--reference-dir", type=Path, default=REPO.parent / "shared" / "reference",
                        help="golden tensors for the parity entry (skipped when missing)")
    args = parser.parse_args()
    entries = SUITES[args.suite]
    if args.only:
        unknown = set(args.only) - {name for name, _, _ in entries}
        if unknown:
            parser.error(f"--only: {sorted(unknown)} not in suite {args.suite!r}: {[n for n, _, _ in entries]}")
        entries = [e for e in entries if e[0] in args.only]
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"suite": args.suite, "python": platform.python_version(), "host": platform.node(), "entries": []}
    for name, script, script_args in entries:
        parity = script == "check_parity.py"  # compares with golden tensors: needs the reference folder
        if parity:
            script_args = ["--reference-dir", str(args.reference_dir), *script_args]
        entry = {"name": name, "command": f"python scripts/{script} {' '.join(script_args)}"}
        print(f"[bench_suite] {name}: {entry['command']}", file=sys.stderr, flush=True)
        if parity and not args.reference_dir.is_dir():
            entry.update(status="skipped", error=f"no reference data at {args.reference_dir} (--reference-dir)")
        else:
            entry.update(run_entry(script, script_args, args.timeout))
        report["entries"].append(entry)
        atomic_save(lambda p: Path(p).write_text(json.dumps(report, indent=1)), args.out / "results.json")
        print(f"[bench_suite] {name}: {entry['status']} {entry.get('error', '')}", file=sys.stderr, flush=True)
    print(markdown_table(report["entries"]))
    return int(any(e["status"] in ("failed", "timeout") for e in report["entries"]))


if __name__ == "__main__":
    sys.exit(cli.run(main))
